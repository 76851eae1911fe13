"""Observation side of the VLA policy: BEV raster, ego-history features, route commands."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roadloop.policies.base import Observation
from roadloop.policies.vla.observe import (
    CH,
    CHANNELS,
    COMMANDS,
    RasterConfig,
    command_index,
    ego_history_features,
    render_bev,
    route_command,
)
from roadloop.scenarios.builder import ScenarioBuilder, straight
from roadloop.scenarios.families import FAMILIES
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import ScenarioMeta
from roadloop.testing.scenes import build, red_light_scene, straight_road

CFG = RasterConfig()
EGO_ROW = CFG.size * (1 - CFG.ego_offset) - 0.5  # 47.5: continuous row of the ego centre
EGO_COL = CFG.size / 2 - 0.5  # 31.5


def _state(*scenes):
    from roadloop.sim.state import init_state

    return init_state(collate(list(scenes)))


def _ahead_scene(heading_north: bool = False):
    """One lane, ego at 10 m, a car 10 m ahead of it (along +x, or along +y if heading_north)."""
    b = ScenarioBuilder(20)
    if heading_north:
        lane = b.add_lane(straight((0, 0), (0, 200)), 3.5, 15.0)
        p, q, yaw = (0.0, 10.0), (0.0, 20.0), math.pi / 2
    else:
        lane = b.add_lane(straight((0, 0), (200, 0)), 3.5, 15.0)
        p, q, yaw = (10.0, 0.0), (20.0, 0.0), 0.0
    b.set_route([lane])
    b.add_agent([p], yaw, 0.0)
    b.add_agent([q], yaw, 0.0)
    return b.build(ScenarioMeta("test/ahead", "test", 0, "test", warmup_steps=0))


def test_shapes_and_ranges():
    st = _state(FAMILIES["intersection_protected"].build_raw(0), FAMILIES["merge"].build_raw(0))
    img = render_bev([st] * 3, CFG)
    assert img.shape == (2, CFG.frames, len(CHANNELS), CFG.size, CFG.size) and img.dtype == torch.float32
    signed = [CH["lane_cos"], CH["lane_sin"]]
    other = [i for i in range(len(CHANNELS)) if i not in signed]
    assert img[:, :, other].min() >= 0 and img[:, :, other].max() <= 1
    assert img[:, :, signed].abs().max() <= 1 + 1e-5
    assert img[:, :, CH["drivable"]].sum() > 0 and img[:, :, CH["vehicles"]].sum() > 0


@pytest.mark.parametrize("north", [False, True])
def test_agent_ahead_painted_above_ego(north):
    img = render_bev([_state(_ahead_scene(north))], CFG)[0, -1]
    veh = img[CH["vehicles"]]
    r_ego, c_ego = int(EGO_ROW), int(EGO_COL)
    assert veh[r_ego, c_ego] == 1 and veh[r_ego + 1, c_ego + 1] == 1  # ego box around (47.5, 31.5)
    r_ahead = EGO_ROW - 10.0 / CFG.resolution  # ~34.2
    assert veh[round(r_ahead), c_ego] == 1 and veh[round(r_ahead), c_ego + 1] == 1
    # the box is 4.6 m long (about 6 px) and 1.9 m wide (about 2.5 px): a vertical blob
    rows = veh[:, c_ego].nonzero().squeeze(1)
    ahead_rows = rows[rows < r_ego - 4]
    assert abs(ahead_rows.float().mean() - r_ahead) < 1.0 and 5 <= len(ahead_rows) <= 7
    cols = veh[round(r_ahead)].nonzero().squeeze(1)
    assert 2 <= len(cols) <= 3
    # drivable area: the 3.5 m lane straight up, nothing beyond it
    drv = img[CH["drivable"]][:40]
    assert (drv[:, 30:34] == 1).all() and (drv[:, :29] == 0).all() and (drv[:, 35:] == 0).all()
    assert (img[CH["lane_cos"]][:40, 30:34] > 0.99).all()
    assert (img[CH["route"]][:40, 31:33] == 1).all() and (img[CH["route"]][:, :28] == 0).all()
    assert (img[CH["centreline"]][:40, 31:33] == 1).all() and (img[CH["centreline"]][:, 30] == 0).all()


def test_speed_limit_and_speed_channels():
    """Each lane carries its own limit; each box its own speed (the ego's too), at every frame."""
    b = ScenarioBuilder(20)
    slow = b.add_lane(straight((0, 0), (200, 0)), 3.5, 10.0)
    b.add_lane(straight((0, 3.5), (200, 3.5)), 3.5, 30.0)
    b.set_route([slow])
    b.add_agent([(10.0, 0.0)], 0.0, 6.0)  # the ego
    b.add_agent([(25.0, 0.0)], 0.0, 12.0)  # 15 m ahead
    s0 = _state(b.build(ScenarioMeta("test/speeds", "test", 0, "test", warmup_steps=0)))
    s1 = s0.replace(speed=s0.speed * 0.5)
    img = render_bev([s0, s1], CFG)[0]  # (F, C, H, W): frames 0-2 are s0, frame 3 is s1
    lim = img[-1, CH["speed_limit"]]
    r_ego, c_ego = int(EGO_ROW), int(EGO_COL)
    assert torch.allclose(lim[:40, c_ego], torch.tensor(10.0 / 40.0))  # the ego's lane, straight ahead
    assert torch.allclose(lim[:40, c_ego - 5], torch.tensor(30.0 / 40.0))  # the left lane (column 0 = left)
    assert (lim[:, :20] == 0).all()  # off road
    assert torch.equal(img[0, CH["speed_limit"]], lim)  # a map channel: the same in every frame
    spd = img[:, CH["speed"]]
    r_ahead = round(EGO_ROW - 15.0 / CFG.resolution)
    assert spd[0, r_ego, c_ego] == pytest.approx(6.0 / 40.0) and spd[0, r_ahead, c_ego] == pytest.approx(12.0 / 40.0)
    assert spd[-1, r_ego, c_ego] == pytest.approx(3.0 / 40.0) and spd[-1, r_ahead, c_ego] == pytest.approx(6.0 / 40.0)
    assert torch.equal(spd > 0, img[:, CH["vehicles"]] > 0)  # painted exactly where the boxes are


def test_red_light_on_stop_line():
    img = render_bev([_state(red_light_scene(stop_x=30.0))], CFG)[0, -1]
    light = img[CH["light"]]
    assert light.max() == 1.0
    rows = (light == 1.0).nonzero()[:, 0].float()
    assert abs(rows.mean() - (EGO_ROW - 20.0 / CFG.resolution)) < 1.0  # stop line 20 m ahead of the ego


def test_frames_differ_when_agents_move():
    b, ids = straight_road(20)
    b.add_agent([[25.0, 0.0]], 0.0, 5.0)
    s0 = _state(build(b))
    xy = s0.xy.clone()
    xy[:, 1, 0] += 3.0
    s1 = s0.replace(xy=xy)
    img = render_bev([s0, s0, s0, s1], CFG)[0]
    assert torch.equal(img[0], img[1]) and not torch.equal(img[2, CH["vehicles"]], img[3, CH["vehicles"]])
    assert torch.equal(img[2, CH["drivable"]], img[3, CH["drivable"]])


def test_batch_rows_equal_single():
    a, b = FAMILIES["intersection_protected"].build_raw(2), FAMILIES["pedestrian_crossing"].build_raw(0)
    both = render_bev([_state(a, b)], CFG)
    assert torch.allclose(both[0:1], render_bev([_state(a)], CFG), atol=1e-6)
    assert torch.allclose(both[1:2], render_bev([_state(b)], CFG), atol=1e-6)


def test_ego_history_features():
    B, T = 2, 16
    t = torch.arange(T, dtype=torch.float32) * 0.1
    yaw = torch.full((B, T), math.pi / 2)
    xy = torch.stack((torch.zeros(B, T), 5.0 + 10.0 * t.expand(B, T)), -1)  # driving north at 10 m/s
    st = _state(_ahead_scene())
    obs = Observation(state=st, ego_history_xy=xy, ego_history_yaw=yaw, ego_history_speed=torch.full((B, T), 10.0),
                      step=0)
    f = ego_history_features(obs)
    assert f.shape == (B, 16, 5)
    assert torch.allclose(f[:, -1], torch.tensor([0.0, 0.0, 1.0, 0.0, 10.0]), atol=1e-5)
    assert torch.allclose(f[:, 0, :2], torch.tensor([-15.0, 0.0]).expand(B, 2), atol=1e-4)  # 1.5 s behind


def _cmds(family: str, seeds) -> list[str]:
    return [route_command(_state(FAMILIES[family].build_raw(s)))[0] for s in seeds]


def test_route_commands_on_families():
    for s in range(4):
        raw = FAMILIES["intersection_protected"].build_raw(s)
        turn = dict(raw.meta.extra)["turn"]
        want = "turn left at the next intersection" if turn == "left" else "follow the route"
        assert route_command(_state(raw)) == [want]
    assert set(_cmds("multilane_traffic", range(3))) == {"follow the route"}
    assert set(_cmds("merge", range(3))) == {"merge onto the main road"}
    assert "turn left at the next intersection" in _cmds("unprotected_left", range(4))
    cmds = route_command(_state(*[FAMILIES["merge"].build_raw(0), FAMILIES["multilane_traffic"].build_raw(0)]))
    assert cmds == ["merge onto the main road", "follow the route"]
    idx = command_index(cmds)
    assert idx.dtype == torch.int64 and [COMMANDS[i] for i in idx] == cmds


def test_lane_change_commands():
    for side in ("left", "right"):
        b = ScenarioBuilder(20)
        lo = b.add_lane(straight((0, 0), (200, 0)), 3.5, 15.0)
        hi = b.add_lane(straight((0, 3.5), (200, 3.5)), 3.5, 15.0)
        b.neighbours(lo, left=hi)
        src, dst = (lo, hi) if side == "left" else (hi, lo)
        y0, y1 = (0.0, 3.5) if side == "left" else (3.5, 0.0)
        x = np.arange(0.0, 201.0)
        y = np.interp(x, [0, 20, 50, 200], [y0, y0, y1, y1])
        b.set_route([src, dst], np.stack((x, y), 1))
        b.add_agent([[5.0, y0]], 0.0, 10.0)
        sc = b.build(ScenarioMeta("test/lc", "test", 0, "test", warmup_steps=0))
        assert route_command(_state(sc)) == [f"keep {side}"]


def test_crosswalk_and_vru_channels():
    b, ids = straight_road(20, lanes=1)
    b.add_crosswalk([[28.0, -3.0], [31.0, -3.0], [31.0, 3.0], [28.0, 3.0]])  # 18-21 m ahead of the ego
    b.add_agent([[20.0, 0.0]], math.pi / 2, 1.0, length=0.6, width=0.6, kind=1)  # pedestrian 10 m ahead
    b.add_static([15.0, 1.0])
    img = render_bev([_state(build(b))], CFG)[0, -1]
    cw = img[CH["crosswalk"]].nonzero()[:, 0].float()
    assert abs(cw.mean() - (EGO_ROW - 19.5 / CFG.resolution)) < 1.0
    assert img[CH["vru"], round(EGO_ROW - 10.0 / CFG.resolution), 31:33].max() == 1
    assert img[CH["static"]].sum() >= 1 and img[CH["vru"]].sum() <= 4


def _reference_map_channels(state, cfg):
    """The straightforward map channels: every pixel centre through ``spatial._query`` (fixed
    candidate windows) and every crosswalk against every pixel; kept to check ``_map_channels``."""
    from roadloop.policies.vla.observe import _lane_index, _to_ego, pixel_centres
    from roadloop.sim import spatial

    B = state.batch_size
    pix = pixel_centres(cfg)
    ex, eyaw = state.xy[:, 0], state.yaw[:, 0]
    c, s = torch.cos(eyaw)[:, None], torch.sin(eyaw)[:, None]
    world = torch.stack((ex[:, None, 0] + c * pix[:, 0] - s * pix[:, 1],
                         ex[:, None, 1] + s * pix[:, 0] + c * pix[:, 1]), -1)
    index = _lane_index(state)
    res = spatial._query(world, eyaw[:, None].expand(B, pix.shape[0]), index, nearest=True)
    on, d2 = res.on.view(B, -1), res.d2.view(B, -1)
    hc = index.seg_pack[6].index_select(0, res.seg).view(B, -1)
    hs = index.seg_pack[7].index_select(0, res.seg).view(B, -1)
    m = state.static.scenario.map
    lane = index.seg_lane.index_select(0, res.seg).view(B, -1).clamp_min(0)
    limit = m.lane_speed_limit.gather(1, lane)
    q = _to_ego(m.crosswalk_xy, ex, eyaw)
    e0, e1 = q, q.roll(-1, dims=-2)
    p = pix.view(1, -1, 1, 1, 2)
    cross = ((e1 - e0)[:, None, ..., 0] * (p[..., 1] - e0[:, None, ..., 1])
             - (e1 - e0)[:, None, ..., 1] * (p[..., 0] - e0[:, None, ..., 0]))
    in_q = ((cross >= 0).all(-1) | (cross <= 0).all(-1)) & m.crosswalk_valid[:, None, :]
    return {
        "drivable": on.float(),
        "lane_cos": torch.where(on, hc * c + hs * s, 0.0),
        "lane_sin": torch.where(on, hs * c - hc * s, 0.0),
        "centreline": (on & (d2 <= max(0.3, 0.5 * cfg.resolution + 1e-3) ** 2)).float(),
        "crosswalk": in_q.any(-1).float(),
        "junction": (on & m.lane_is_junction.gather(1, lane)).float(),
        "speed_limit": torch.where(on, limit / 40.0, 0.0).clamp(0.0, 1.0),
    }


def test_map_channels_match_reference():
    from roadloop.policies.vla.observe import _map_channels

    fams = ["intersection_protected", "multilane_traffic", "merge", "roundabout", "pedestrian_crossing",
            "unprotected_left", "construction_zone"]
    st = _state(*[FAMILIES[f].build_raw(s) for f in fams for s in range(2)])
    g = torch.Generator().manual_seed(0)
    states = [st]
    for _ in range(2):  # the ego moved around (on and off road, any heading)
        xy, yaw = st.xy.clone(), st.yaw.clone()
        xy[:, 0] += 8.0 * torch.randn(xy[:, 0].shape, generator=g)
        yaw[:, 0] += 3.0 * torch.rand(yaw[:, 0].shape, generator=g)
        states.append(st.replace(xy=xy, yaw=yaw))
    seen = torch.zeros(3)
    for s in states:
        got, ref = _map_channels(s, CFG), _reference_map_channels(s, CFG)
        assert set(got) == set(ref)
        on_g, on_r = got["drivable"] > 0, ref["drivable"] > 0
        seen += torch.stack((ref["centreline"].sum(), ref["crosswalk"].sum(), ref["junction"].sum()))
        assert (on_g == on_r).float().mean() >= 0.999
        both = on_g & on_r
        for ch in ("lane_cos", "lane_sin"):
            assert torch.allclose(got[ch][both], ref[ch][both], atol=1e-5)
            assert (got[ch][~on_g] == 0).all()
        for ch in ("centreline", "crosswalk", "junction", "speed_limit"):
            assert (got[ch] == ref[ch]).float().mean() >= 0.999
    assert (seen > 0).all()  # the comparison covered lanes, crosswalks and intersections


def _quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The storage format's definition on whole tensors: (uint8 levels, decoded floats)."""
    from roadloop.policies.vla.observe import SIGNED_CHANNELS

    signed = torch.zeros(x.shape[-3], dtype=torch.bool)
    signed[list(SIGNED_CHANNELS)] = True
    signed = signed.view(-1, 1, 1)
    q = torch.where(signed, (x.clamp(-1, 1) + 1.0) * 127.5, x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    deq = torch.addcdiv(torch.where(signed, -1.0, 0.0).float(), q.float(), torch.where(signed, 127.5, 255.0).float())
    return q, deq


def test_raster_quantisation_is_the_storage_format_bit_for_bit():
    """encode / decode / the policy's in-place quantize_raster give exactly the values the demonstrations store
    and decode (every level of every channel; exact half levels, out-of-range values and -0.0 included)."""
    from roadloop.policies.vla.observe import decode_raster, encode_raster, quantize_raster

    C = len(CHANNELS)
    q_all = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(C, 4, 256).contiguous()
    assert torch.equal(decode_raster(q_all), _quantize_reference(decode_raster(q_all))[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, C, 16, 64, generator=g) * 0.7
    x[0, 0, :, 0] = (torch.arange(64) + 0.5) / 255.0  # ties of the unsigned rounding
    x[0, 0, :, 1] = (torch.arange(64) + 0.5) / 127.5 - 1.0  # ties of the signed one
    x[0, 0, :, 2, :3] = torch.tensor([-0.0, 5.0, -5.0])
    ref_q, ref_deq = _quantize_reference(x)
    x0 = x.clone()
    assert torch.equal(encode_raster(x), ref_q) and torch.equal(x, x0)  # encode leaves its input alone
    assert torch.equal(decode_raster(ref_q), ref_deq)
    deq, q = quantize_raster(x, keep_uint8=True)
    assert torch.equal(q, ref_q) and torch.equal(deq, ref_deq) and deq.data_ptr() == x.data_ptr()
    assert quantize_raster(x0.clone())[1] is None


def test_channels_last_decoding_is_the_same_values_laid_out_for_the_stem():
    """decode_raster(channels_last=True) gives decode_raster's values bit for bit (every level of every channel),
    laid out so that the stem's (B, F*C, H, W) view is channels-last without a copy; the model's vision tokens
    on either layout agree to float rounding; bad shapes are refused."""
    from roadloop.policies.vla.model import VLAConfig, VLAModel
    from roadloop.policies.vla.observe import channels_last_raster, decode_raster

    C = len(CHANNELS)
    q = torch.arange(256, dtype=torch.uint8).repeat(2 * 4 * C * 8 * 8 // 256 + 1)[:2 * 4 * C * 8 * 8]
    q = q.view(2, 4, C, 8, 8)
    q = q[torch.randperm(2)]  # a gathered batch, as DemoTensors.bev decodes
    ref, cl = decode_raster(q), decode_raster(q, channels_last=True)
    assert cl.shape == ref.shape and torch.equal(cl, ref)
    flat = cl.reshape(2, 4 * C, 8, 8)
    assert flat.data_ptr() == cl.data_ptr() and flat.is_contiguous(memory_format=torch.channels_last)
    relaid = channels_last_raster(ref)  # a float raster laid out the same way (RoaD's candidates)
    assert torch.equal(relaid, ref) and relaid.stride() == cl.stride() and channels_last_raster(cl).data_ptr() == \
        cl.data_ptr()
    rows = cl[torch.tensor([1, 1, 0])]  # gathered rows keep the layout (openloop's and RoaD's K samples a row)
    assert rows.reshape(3, 4 * C, 8, 8).is_contiguous(memory_format=torch.channels_last)
    lead = decode_raster(q.unsqueeze(0).expand(3, -1, -1, -1, -1, -1), channels_last=True)  # (D, B, ...), as GRPO
    assert torch.equal(lead, ref.expand(3, -1, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="needs"):
        decode_raster(q[0, 0, 0], channels_last=True)
    torch.manual_seed(0)
    model = VLAModel(VLAConfig(d_model=32, n_layers=1, n_heads=2, raster_size=64, patch=16)).eval()
    g = torch.Generator().manual_seed(1)
    bev_q = torch.randint(0, 256, (3, 4, C, 64, 64), dtype=torch.uint8, generator=g)
    obs = {"history": torch.randn(3, 16, 5, generator=g), "command": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        a = model._prefix({**obs, "bev": decode_raster(bev_q)})
        b = model._prefix({**obs, "bev": decode_raster(bev_q, channels_last=True)})
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_quantised_channels_last_render_is_the_quantised_raster_bit_for_bit():
    """render_bev(quantized=True) is quantize_raster(render_bev(...)) bit for bit (map channels, lights, boxes and
    speeds over moving frames of every family), channels_last=True the same values laid out (B, H, W, F, C) so the
    stem's view is channels-last without a copy; the quantised raster encodes to the same uint8 levels."""
    from roadloop.policies.vla.observe import decode_raster, encode_raster, quantize_raster
    from roadloop.sim.config import SimConfig
    from roadloop.sim.step import step

    raws = [FAMILIES[f].build_raw(s) for s, f in enumerate(sorted(FAMILIES))]
    st = _state(*raws)
    hist = [st]
    for _ in range(5):  # the log replayed: agents and lights move between frames
        hist.append(step(hist[-1], None, SimConfig()))
    hist = hist[::2][-CFG.frames:]
    B, F, C, n = len(raws), CFG.frames, len(CHANNELS), CFG.size
    ref = render_bev(hist, CFG)
    assert not torch.equal(ref[:, 0, CH["vehicles"]], ref[:, -1, CH["vehicles"]])
    ref_q = quantize_raster(ref.clone())[0]
    assert not torch.equal(ref_q, ref)  # the grid changes graded values (lane headings, speeds)
    for quantized in (False, True):
        for channels_last in (False, True):
            out = render_bev(hist, CFG, quantized=quantized, channels_last=channels_last)
            assert out.shape == (B, F, C, n, n)
            assert torch.equal(out, ref_q if quantized else ref), (quantized, channels_last)
            if channels_last:
                assert out.permute(0, 3, 4, 1, 2).is_contiguous()
                stem = out.reshape(B, F * C, n, n)
                assert stem.data_ptr() == out.data_ptr() and stem.is_contiguous(memory_format=torch.channels_last)
            else:
                assert out.is_contiguous()
    assert torch.equal(encode_raster(ref_q), encode_raster(ref))  # every stored level survives the round trip
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(C, 4, 256).contiguous()
    assert torch.equal(encode_raster(decode_raster(levels)), levels)


def test_raster_geometry_sets_how_far_ahead_the_view_reaches():
    """A car 50 m ahead is outside the default view (40.8 m ahead) and inside a 1 m/px one (57.6 m)."""
    b = ScenarioBuilder(20)
    lane = b.add_lane(straight((0, 0), (200, 0)), 3.5, 15.0)
    b.set_route([lane])
    b.add_agent([(10.0, 0.0)], 0.0, 0.0)
    b.add_agent([(60.0, 0.0)], 0.0, 0.0)
    st = _state(b.build(ScenarioMeta("test/far", "test", 0, "test", warmup_steps=0)))
    near = render_bev([st], CFG)[0, -1, CH["vehicles"]]
    far_cfg = RasterConfig(resolution=1.0, ego_offset=0.1)
    far = render_bev([st], far_cfg)[0, -1, CH["vehicles"]]
    ego_row = far_cfg.size * (1 - far_cfg.ego_offset) - 0.5  # 57.1
    assert near[: int(EGO_ROW) - 4].sum() == 0  # only the ego
    r_lead = round(ego_row - 50.0 / far_cfg.resolution)  # ~7
    assert far[r_lead, 31] == 1 and far[r_lead, 32] == 1
    assert far[round(ego_row), 31] == 1  # the ego, 6.4 m above the bottom edge
