"""Export one rollout as an animated GIF (or MP4 with imageio-ffmpeg), drawn with PIL.

Same visual language as the HTML report viewer (``roadloop.eval.html.PALETTE``): grey lanes
with dashed white centrelines, striped crosswalks, stop lines in their light's colour, agents
as oriented boxes coloured by kind, the ego in magenta with its trail, its current plan in
green and the route faint blue.  The camera follows the ego.  Frames are drawn at 2x and
downsampled (anti-aliasing); a caption strip shows time, speed, check flags and reasoning.
"""

from __future__ import annotations

import importlib.util
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from roadloop.errors import RoadloopError
from roadloop.eval.html import FLAG_BITS, PALETTE, rollout_view
from roadloop.rollout import Rollout
from roadloop.sim.datatypes import Scenario

SS = 2  # supersampling factor
KIND_COLORS = [PALETTE["vehicle"], PALETTE["pedestrian"], PALETTE["cyclist"], PALETTE["static"]]
FLAG_LABELS = [("at_fault", "AT-FAULT COLLISION", "#dc2626"), ("collision", "COLLISION", "#dc2626"),
               ("offroad", "OFF-ROAD", "#d97706"), ("red_light", "RED LIGHT", "#ef4444"),
               ("wrong_way", "WRONG WAY", "#7c3aed")]


def _rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _mix(c: tuple[int, int, int], bg: tuple[int, int, int], a: float) -> tuple[int, int, int]:
    return tuple(int(round(a * x + (1 - a) * y)) for x, y in zip(c, bg, strict=True))


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _arr(v) -> np.ndarray:
    return np.array(v, dtype=np.float64).reshape(-1, 2) if len(v) else np.zeros((0, 2))


def _offset(pts: np.ndarray, d: float) -> np.ndarray:
    a = np.concatenate((pts[:1], pts[:-1]))
    b = np.concatenate((pts[1:], pts[-1:]))
    t = b - a
    t /= np.linalg.norm(t, axis=1, keepdims=True).clip(1e-9)
    return pts + d * np.stack((-t[:, 1], t[:, 0]), -1)


def _dashes(pts: np.ndarray, on: float = 3.0, period: float = 6.0) -> list[np.ndarray]:
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate(([0.0], np.cumsum(seg)))
    out = []
    for s0 in np.arange(0.0, s[-1], period):
        q = np.linspace(s0, min(s0 + on, s[-1]), 4)
        out.append(np.stack((np.interp(q, s, pts[:, 0]), np.interp(q, s, pts[:, 1])), -1))
    return out


class _Scene:
    """Static map geometry of one view, in world coordinates, with bounding boxes for culling."""

    def __init__(self, view: dict):
        self.lane_polys, self.centres, self.edges, self.cw_fill, self.cw_stripes = [], [], [], [], []
        for ln in view["lanes"]:
            p = _arr(ln["xy"])
            if len(p) < 2:
                continue
            self.lane_polys.append((np.concatenate((_offset(p, ln["w"] / 2), _offset(p, -ln["w"] / 2)[::-1])),
                                    bool(ln["j"])))
            self.centres += [(d, bool(ln["j"])) for d in _dashes(p, 3.0, 6.0 if not ln["j"] else 3.0)]
        self.edges = [_arr(e) for e in view["edges"] if len(e) >= 4]
        for c in view["crosswalks"]:
            q = _arr(c)
            self.cw_fill.append(q)
            u, w, o = q[1] - q[0], q[3] - q[0], q[0]
            if np.linalg.norm(w) > np.linalg.norm(u):
                u, w = w, u
            L = float(np.linalg.norm(u)) or 1.0
            for k in range(int(L // 1.1)):
                a, b = o + u * (k * 1.1 + 0.3) / L, o + u * (k * 1.1 + 0.8) / L
                self.cw_stripes.append(np.stack((a, b, b + w, a + w)))
        self.stops = [(_arr(s["xy"]), s["light"]) for s in view["stops"]]
        self.route = _arr(view["route"])
        self.plans = [_arr(p) for p in view["plans"]]
        n = view["n"]
        self.agents = []
        for a in view["agents"]:
            get = lambda k, a=a: (np.array(a[k], dtype=np.float64) if isinstance(a[k], list)
                                  else np.full(n, float(a[k])))
            self.agents.append((get("x"), get("y"), get("h"), a["l"], a["w"], a["k"]))


def _box(x: float, y: float, h: float, length: float, width: float) -> np.ndarray:
    c, s = np.cos(h), np.sin(h)
    dx = np.array([0.5, 0.5, -0.5, -0.5]) * length
    dy = np.array([-0.5, 0.5, 0.5, -0.5]) * width
    return np.stack((x + c * dx - s * dy, y + s * dx + c * dy), -1)


def render_frames(view: dict, size: tuple[int, int] = (640, 480), zoom: float = 6.0, caption: int = 84,
                  frames: Iterable[int] | None = None) -> Iterator[np.ndarray]:
    """Yield the frames (H, W, 3) uint8 of a ``rollout_view`` dict (all, or the indices ``frames``).

    ``size`` is (width, height) in pixels including the ``caption`` strip; ``zoom`` in pixels per metre.
    """
    W, H = size
    Hm = H - caption
    sc = _Scene(view)
    bg = _rgb(PALETTE["ground"])
    lane_c, junc_c, edge_c = _rgb(PALETTE["lane"]), _rgb(PALETTE["junction"]), _rgb(PALETTE["edge"])
    route_c = _mix(_rgb(PALETTE["route"]), lane_c, 0.2)
    trail_c = _mix(_rgb(PALETTE["trail"]), lane_c, 0.6)
    font, font_b, font_s = _font(13 * SS), _font(12 * SS), _font(12)
    ego_i = view["ego"]
    ex, ey, eh = sc.agents[ego_i][:3]
    dec = np.array(view["dec"], dtype=np.int64)
    z = zoom * SS
    Ws, Hs = W * SS, Hm * SS
    half = np.array([Ws / 2 / z, Hs / 2 / z]) + 6.0

    for f in range(view["n"]) if frames is None else frames:
        cx, cy = (ex[f], ey[f]) if np.isfinite(ex[f]) else (ex[0], ey[0])
        img = Image.new("RGB", (Ws, Hs), bg)
        dr = ImageDraw.Draw(img)
        lo, hi = np.array([cx, cy]) - half, np.array([cx, cy]) + half

        def vis(p: np.ndarray, lo=lo, hi=hi) -> bool:
            return bool(len(p)) and bool((p.max(0) >= lo).all() and (p.min(0) <= hi).all())

        def tp(p: np.ndarray, cx=cx, cy=cy) -> list[tuple[float, float]]:
            return [(float((x - cx) * z + Ws / 2), float(Hs / 2 - (y - cy) * z)) for x, y in p]

        for poly, j in sc.lane_polys:
            if vis(poly):
                dr.polygon(tp(poly), fill=junc_c if j else lane_c)
        for q in sc.cw_fill:
            if vis(q):
                dr.polygon(tp(q), fill=_mix((255, 255, 255), lane_c, 0.12))
        for q in sc.cw_stripes:
            if vis(q):
                dr.polygon(tp(q), fill=_rgb(PALETTE["crosswalk"]))
        for e in sc.edges:
            if vis(e):
                dr.line(tp(e), fill=edge_c, width=max(2, int(1.6 * SS)), joint="curve")
        for d, j in sc.centres:
            if vis(d):
                dr.line(tp(d), fill=_mix((255, 255, 255), lane_c, 0.6 if j else 1.0),
                        width=max(1, int(1.2 * SS)))
        for p, light in sc.stops:
            if vis(p):
                st = view["lights"].get(str(light)) if light >= 0 else None
                col = PALETTE["light"][st[min(f, len(st) - 1)]] if st else "#ffffff"
                dr.line(tp(p), fill=_rgb(col), width=max(3, int(0.5 * z)))
        if len(sc.route) >= 2:
            dr.line(tp(sc.route), fill=route_c, width=int(6 * SS), joint="curve")
        tr = np.stack((ex[: f + 1], ey[: f + 1]), -1)
        tr = tr[np.isfinite(tr).all(1)]
        if len(tr) >= 2:
            dr.line(tp(tr), fill=trail_c, width=int(2.5 * SS), joint="curve")
        k = int(np.searchsorted(dec, f, side="right")) - 1
        if k >= 0 and len(sc.plans[k]) >= 2:
            pl = tp(sc.plans[k])
            dr.line(pl, fill=_rgb(PALETTE["plan"]), width=int(2.5 * SS), joint="curve")
            r = 2.4 * SS
            for x, y in pl[::5]:
                dr.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(PALETTE["plan"]))
        hit = view["hits"].get(str(f))
        for i, (ax, ay, ah, al, aw, ak) in enumerate(sc.agents):
            if not np.isfinite(ax[f]):
                continue
            mn = 6.0 / zoom if ak in (1, 3) else 0.0  # keep pedestrians and cones visible
            poly = _box(ax[f], ay[f], ah[f], max(al, mn), max(aw, mn))
            if not vis(poly):
                continue
            if i == ego_i:
                fill, edge, wd = _rgb(PALETTE["ego"]), _rgb(PALETTE["ego_edge"]), int(2.2 * SS)
            else:
                fill = _rgb(KIND_COLORS[ak] if 0 <= ak < 4 else PALETTE["vehicle"])
                edge = _rgb(PALETTE["hit"]) if i == hit else tuple(int(c * 0.6) for c in fill)
                wd = int((3.5 if i == hit else 1.2) * SS)
            pts = tp(poly)
            dr.polygon(pts, fill=fill)
            dr.line(pts + pts[:1], fill=edge, width=max(1, wd), joint="curve")
            if ak in (0, 2) or i == ego_i:  # windscreen mark for the heading
                lw = min(1.3, al * 0.3)
                c, s = np.cos(ah[f]), np.sin(ah[f])
                mx = ax[f] + c * (al / 2 - lw / 2 - 0.1)
                my = ay[f] + s * (al / 2 - lw / 2 - 0.1)
                mark = _box(mx, my, ah[f], min(0.55, al * 0.12), aw * 0.7)
                dr.polygon(tp(mark), fill=_mix((255, 255, 255), fill, 0.75))
        # overlays on the map: flags, time
        fl = view["flags"][f]
        x = 10 * SS
        for bit, text, col in FLAG_LABELS:
            if fl & FLAG_BITS[bit] and not (bit == "collision" and fl & FLAG_BITS["at_fault"]):
                w = dr.textlength(text, font=font_b) + 14 * SS
                dr.rounded_rectangle((x, 10 * SS, x + w, 32 * SS), 5 * SS, fill=_rgb(col))
                dr.text((x + 7 * SS, 14 * SS), text, font=font_b, fill=(255, 255, 255))
                x += w + 6 * SS
        if fl & (FLAG_BITS["collision"] | FLAG_BITS["offroad"]):
            dr.rectangle((0, 0, Ws - 1, Hs - 1), outline=_rgb(PALETTE["hit"]), width=4 * SS)
        ts = f"t = {f * view['dt']:.1f} s"
        tw = dr.textlength(ts, font=font)
        dr.rounded_rectangle((Ws - tw - 26 * SS, 10 * SS, Ws - 10 * SS, 33 * SS), 5 * SS, fill=(15, 23, 42))
        dr.text((Ws - tw - 18 * SS, 13 * SS), ts, font=font, fill=(255, 255, 255))
        frame = img.resize((W, Hm), Image.Resampling.BOX)
        # caption strip
        out = Image.new("RGB", (W, H), (255, 255, 255))
        out.paste(frame, (0, 0))
        cd = ImageDraw.Draw(out)
        cd.line((0, Hm, W, Hm), fill=(226, 230, 235), width=1)
        sp = view["speed"][f]
        head = (f"{view['scenario_id']}   step {f}/{view['n'] - 1}   "
                f"{'–' if sp is None else f'{sp:.1f} m/s'}" + ("   (warm-up)" if f < view["warmup"] else ""))
        cd.text((10, Hm + 6), head, font=_font(13), fill=(31, 41, 51))
        txt = view["texts"][view["ti"][k]] if k >= 0 else ""
        if view["failed"]:
            txt = f"FAILED: {view['reason']}"
        lines = textwrap.wrap(txt, width=max(20, int(W / 6.6)))[:3] if txt else ["(no reasoning text)"]
        for li, line in enumerate(lines):
            cd.text((10, Hm + 26 + 16 * li), line, font=font_s,
                    fill=(71, 85, 105) if txt else (154, 165, 177))
        yield np.asarray(out)


def _palette(view: dict, colors: int = 160, **kw) -> Image.Image:
    """One GIF palette for all frames (from 4 frames spread over the rollout): no colour flicker."""
    idx = np.unique(np.linspace(0, view["n"] - 1, min(4, view["n"])).round().astype(int)).tolist()
    strip = np.concatenate(list(render_frames(view, frames=idx, **kw)), axis=0)
    # make sure the small but important colours (agents by kind, lights) get their own entries
    keys = [c for k, c in PALETTE.items() if k != "light"] + list(PALETTE["light"].values())
    w = strip.shape[1]
    sw = np.repeat(np.array([_rgb(c) for c in keys], np.uint8), 8 * w // len(keys) + 1, axis=0)
    strip = np.concatenate((strip, sw[: 8 * w].reshape(8, w, 3)), axis=0)
    return Image.fromarray(strip).quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)


def export_rollout(ro: Rollout, scenario: Scenario, b: int, path: Path, fps: int = 10,
                   size: tuple[int, int] = (640, 480), zoom: float = 6.0) -> Path:
    """Write rollout ``b`` of ``ro`` (on the batched ``scenario``) as a GIF, or an MP4 if ``path``
    ends with ``.mp4`` (needs imageio-ffmpeg).  One frame per state (T+1 frames) at ``fps``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise RoadloopError(f"export path must end with .gif or .mp4, got '{path.name}'")
    if not 0 <= b < ro.batch_size:
        raise RoadloopError(f"rollout index {b} out of range for a batch of {ro.batch_size}")
    if fps <= 0:
        raise RoadloopError(f"fps must be > 0, got {fps}")
    if suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise RoadloopError("MP4 export needs an ffmpeg backend: pip install imageio-ffmpeg "
                            "(or export to .gif)")
    if suffix == ".mp4":
        size = (size[0] // 16 * 16, size[1] // 16 * 16)
    view = rollout_view(ro, scenario, b)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = render_frames(view, size=size, zoom=zoom)
    if suffix == ".gif":
        pal = _palette(view, size=size, zoom=zoom)
        ims = [Image.fromarray(fr).quantize(palette=pal, dither=Image.Dither.NONE) for fr in frames]
        tmp = path.with_name(f".{path.name}.tmp")
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=int(round(1000 / fps)),
                    loop=0, disposal=1, optimize=False)
        tmp.replace(path)
    else:
        import imageio.v2 as imageio

        with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16) as w:
            for fr in frames:
                w.append_data(fr)
    return path
