"""Real road networks and real traffic through SUMO (Eclipse SUMO, EPL-2.0; map data ODbL).

* ``network``: import any SUMO ``.net.xml[.gz]`` with sumolib into a numpy ``RoadNetwork`` and
  crop regions of it into a ``ScenarioBuilder``;
* ``traffic``: simulate traffic with libsumo, record every vehicle at 10 Hz and cut the
  recording into scenarios;
* ``suite``: ``build_sumo_suite`` and the built-in ``sumo-real`` networks.
"""

from roadloop.sumo.network import (
    ImportReport,
    NetworkImportError,
    RoadNetwork,
    crop_network,
    load_network,
    network_to_scenario_map,
)

__all__ = [
    "ImportReport",
    "NetworkImportError",
    "RoadNetwork",
    "crop_network",
    "load_network",
    "network_to_scenario_map",
]
