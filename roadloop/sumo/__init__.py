"""Real road networks and real traffic through SUMO (Eclipse SUMO, EPL-2.0; map data ODbL).

* ``network``: import any SUMO ``.net.xml[.gz]`` with sumolib into a numpy ``RoadNetwork``;
* ``crop``: crop regions of a network into a ``ScenarioBuilder``;
* ``traffic``: simulate traffic with libsumo and record every vehicle at 10 Hz;
* ``cutting``: cut a recording into scenarios (one ego vehicle and window each);
* ``suite``: ``build_sumo_suite`` for any network and ``build_sumo_real`` (``sumo-real``);
* ``cosim``: ``SumoCosim``, live co-simulation (SUMO moves the traffic, roadloop the ego);
* ``preview``: matplotlib renderings for a visual check.
"""

from roadloop.sumo.cosim import SumoCosim
from roadloop.sumo.crop import add_crop_to_builder, crop_network, network_to_scenario_map
from roadloop.sumo.cutting import cut_scenario, cut_scenarios
from roadloop.sumo.network import ImportReport, NetworkImportError, RoadNetwork, load_network
from roadloop.sumo.suite import SUMO_REAL_NETWORKS, build_sumo_real, build_sumo_suite
from roadloop.sumo.traffic import Recording, SumoTrafficError, random_trips, record_traffic

__all__ = [
    "SUMO_REAL_NETWORKS",
    "ImportReport",
    "NetworkImportError",
    "Recording",
    "RoadNetwork",
    "SumoCosim",
    "SumoTrafficError",
    "add_crop_to_builder",
    "build_sumo_real",
    "build_sumo_suite",
    "crop_network",
    "cut_scenario",
    "cut_scenarios",
    "load_network",
    "network_to_scenario_map",
    "random_trips",
    "record_traffic",
]
