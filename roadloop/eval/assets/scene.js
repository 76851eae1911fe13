/* roadloop scene drawing (vanilla JS, no network): one frame of a rollout view
   (roadloop.eval.html.rollout_view) drawn top-down on a canvas, its incident timeline and its
   reasoning panel.  Shared by viewer.js (evaluation report) and compare.js (demo before/after players). */
var RoadloopScene = (function () {
  "use strict";
  const FLAG_TEXT = [["at_fault", "AT-FAULT COLLISION"], ["collision", "COLLISION"], ["offroad", "OFF-ROAD"],
                     ["red_light", "RED LIGHT"], ["wrong_way", "WRONG WAY"]];

  // ---------------------------------------------------------------- geometry helpers
  function pairs(flat) { const out = []; for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i], flat[i + 1]]); return out; }
  function offsetLine(pts, d) {
    const n = pts.length, out = [];
    for (let i = 0; i < n; i++) {
      const a = pts[Math.max(i - 1, 0)], b = pts[Math.min(i + 1, n - 1)];
      let dx = b[0] - a[0], dy = b[1] - a[1]; const L = Math.hypot(dx, dy) || 1; dx /= L; dy /= L;
      out.push([pts[i][0] - dy * d, pts[i][1] + dx * d]);
    }
    return out;
  }
  function pathOf(pts, close) {
    const p = new Path2D();
    pts.forEach((q, i) => (i ? p.lineTo(q[0], q[1]) : p.moveTo(q[0], q[1])));
    if (close) p.closePath();
    return p;
  }
  function at(a, f) { return Array.isArray(a) ? a[f] : a; }

  function buildGeometry(v) {
    const g = { lanePoly: new Path2D(), junctionPoly: new Path2D(), centres: new Path2D(), jcentres: new Path2D(),
                edges: new Path2D(), cwFill: new Path2D(), cwStripes: new Path2D(), route: null };
    for (const ln of v.lanes) {
      const pts = pairs(ln.xy);
      if (pts.length < 2) continue;
      const poly = offsetLine(pts, ln.w / 2).concat(offsetLine(pts, -ln.w / 2).reverse());
      (ln.j ? g.junctionPoly : g.lanePoly).addPath(pathOf(poly, true));
      (ln.j ? g.jcentres : g.centres).addPath(pathOf(pts, false));
    }
    for (const e of v.edges) g.edges.addPath(pathOf(pairs(e), false));
    for (const c of v.crosswalks) {
      const q = pairs(c);
      g.cwFill.addPath(pathOf(q, true));
      // stripes: bars across the long side, 0.5 m wide every 1.1 m
      let u = [q[1][0] - q[0][0], q[1][1] - q[0][1]], w = [q[3][0] - q[0][0], q[3][1] - q[0][1]], o = q[0];
      if (Math.hypot(...w) > Math.hypot(...u)) { const t = u; u = w; w = t; }
      const Lu = Math.hypot(...u) || 1, n = Math.floor(Lu / 1.1);
      for (let k = 0; k < n; k++) {
        const s0 = (k * 1.1 + 0.3) / Lu, s1 = (k * 1.1 + 0.8) / Lu;
        const a = [o[0] + u[0] * s0, o[1] + u[1] * s0], b = [o[0] + u[0] * s1, o[1] + u[1] * s1];
        g.cwStripes.addPath(pathOf([a, b, [b[0] + w[0], b[1] + w[1]], [a[0] + w[0], a[1] + w[1]]], true));
      }
    }
    if (v.route.length >= 4) g.route = pathOf(pairs(v.route), false);
    g.plans = v.plans.map((p) => (p.length >= 4 ? pairs(p) : null));
    g.ego = [];
    const e = v.agents[v.ego];
    for (let f = 0; f < v.n; f++) g.ego.push([at(e.x, f), at(e.y, f), at(e.h, f)]);
    return g;
  }

  // ---------------------------------------------------------------- camera
  /** Camera {cx, cy, zoom} showing every agent of every view in ``views`` on a w x h (CSS px) canvas. */
  function fitCamera(views, w, h) {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const v of views) {
      for (const a of v.agents) {
        const xs = Array.isArray(a.x) ? a.x : [a.x], ys = Array.isArray(a.y) ? a.y : [a.y];
        xs.forEach((x, i) => { if (x !== null) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, ys[i]); y1 = Math.max(y1, ys[i]); } });
      }
    }
    if (!isFinite(x0)) return { cx: 0, cy: 0, zoom: 6 };
    const m = 15;
    return { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2,
             zoom: Math.max(0.3, Math.min(40, Math.min(w / (x1 - x0 + 2 * m), h / (y1 - y0 + 2 * m)))) };
  }

  // ---------------------------------------------------------------- drawing
  function shade(hex) {
    const n = parseInt(hex.slice(1), 16), r = (n >> 16) * 0.6, gg = ((n >> 8) & 255) * 0.6, b = (n & 255) * 0.6;
    return `rgb(${r | 0},${gg | 0},${b | 0})`;
  }
  function box(ctx, x, y, hd, l, wd, fill, stroke, lw, nose) {
    ctx.save(); ctx.translate(x, y); ctx.rotate(hd);
    ctx.fillStyle = fill; ctx.strokeStyle = stroke; ctx.lineWidth = lw;
    ctx.beginPath(); ctx.rect(-l / 2, -wd / 2, l, wd); ctx.fill(); ctx.stroke();
    if (nose) { // windscreen mark shows the heading
      ctx.fillStyle = "rgba(255,255,255,0.75)";
      ctx.beginPath(); ctx.rect(l / 2 - Math.min(1.3, l * 0.3), -wd / 2 + wd * 0.15, Math.min(0.55, l * 0.12), wd * 0.7); ctx.fill();
    }
    ctx.restore();
  }
  function scaleBar(ctx, w, h, z) {
    const targets = [1, 2, 5, 10, 20, 50, 100, 200, 500];
    let m = targets[0]; for (const t of targets) if (t * z <= 120) m = t;
    const L = m * z, x = 12, y = h - 14;
    ctx.strokeStyle = "#334155"; ctx.lineWidth = 2; ctx.lineCap = "butt";
    ctx.beginPath(); ctx.moveTo(x, y - 4); ctx.lineTo(x, y); ctx.lineTo(x + L, y); ctx.lineTo(x + L, y - 4); ctx.stroke();
    ctx.fillStyle = "#334155"; ctx.font = "11px sans-serif"; ctx.fillText(m + " m", x + L + 5, y + 1);
  }
  function decisionAt(v, f) {
    const dec = v.dec; let lo = 0, hi = dec.length - 1, ans = -1;
    while (lo <= hi) { const m = (lo + hi) >> 1; if (dec[m] <= f) { ans = m; lo = m + 1; } else hi = m - 1; }
    return ans;
  }

  /** Draw frame ``f`` of view ``v`` (geometry ``g`` of buildGeometry) on ``ctx`` (w x h CSS px at ``dpr``)
      with camera ``cam`` {cx, cy, zoom, follow}; a following camera is moved onto the ego. */
  function drawScene(ctx, P, v, g, f, cam, w, h, dpr) {
    const KIND_COLOR = [P.vehicle, P.pedestrian, P.cyclist, P.static];
    const ego = g.ego[f];
    if (cam.follow && ego[0] !== null) { cam.cx = ego[0]; cam.cy = ego[1]; }
    const z = cam.zoom, px = 1 / z;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = P.ground; ctx.fillRect(0, 0, w, h);
    ctx.setTransform(z * dpr, 0, 0, -z * dpr, dpr * (w / 2 - cam.cx * z), dpr * (h / 2 + cam.cy * z));
    ctx.lineJoin = "round"; ctx.lineCap = "round";
    // map
    ctx.fillStyle = P.lane; ctx.fill(g.lanePoly);
    ctx.fillStyle = P.junction; ctx.fill(g.junctionPoly);
    ctx.strokeStyle = P.edge; ctx.lineWidth = Math.max(0.25, 1.6 * px); ctx.stroke(g.edges);
    ctx.fillStyle = "rgba(255,255,255,0.12)"; ctx.fill(g.cwFill);
    ctx.fillStyle = P.crosswalk; ctx.fill(g.cwStripes);
    if (z >= 2) {  // centrelines only when they do not clutter the view
      ctx.strokeStyle = P.centre; ctx.lineWidth = Math.max(0.12, 1.2 * px);
      ctx.setLineDash([3, 3]); ctx.stroke(g.centres);
      ctx.globalAlpha = 0.6; ctx.setLineDash([1, 2]); ctx.stroke(g.jcentres); ctx.globalAlpha = 1; ctx.setLineDash([]);
    }
    for (const s of v.stops) {
      const st = s.light >= 0 && v.lights[s.light] ? v.lights[s.light][Math.min(f, v.lights[s.light].length - 1)] : null;
      ctx.strokeStyle = st === null ? "#ffffff" : P.light[st] || P.light["0"];
      ctx.lineWidth = Math.max(0.6, 3 * px); ctx.lineCap = "butt";
      ctx.beginPath(); ctx.moveTo(s.xy[0], s.xy[1]); ctx.lineTo(s.xy[2], s.xy[3]); ctx.stroke();
      ctx.lineCap = "round";
    }
    // route, trail, plan
    if (g.route) { ctx.globalAlpha = 0.16; ctx.strokeStyle = P.route; ctx.lineWidth = Math.max(1.6, 6 * px); ctx.stroke(g.route); ctx.globalAlpha = 1; }
    ctx.beginPath(); let started = false;
    for (let k = 0; k <= f; k++) { const p = g.ego[k]; if (p[0] === null) continue; started ? ctx.lineTo(p[0], p[1]) : ctx.moveTo(p[0], p[1]); started = true; }
    ctx.globalAlpha = 0.55; ctx.strokeStyle = P.trail; ctx.lineWidth = Math.max(0.3, 2.5 * px); ctx.stroke(); ctx.globalAlpha = 1;
    const d = decisionAt(v, f);
    if (d >= 0 && g.plans[d]) {
      const pl = g.plans[d];
      ctx.strokeStyle = P.plan; ctx.lineWidth = Math.max(0.3, 2.5 * px); ctx.stroke(pathOf(pl, false));
      ctx.fillStyle = P.plan;
      for (let k = 0; k < pl.length; k += 5) { ctx.beginPath(); ctx.arc(pl[k][0], pl[k][1], Math.max(0.25, 2.4 * px), 0, 2 * Math.PI); ctx.fill(); }
    }
    // agents
    const hit = v.hits[String(f)];
    v.agents.forEach((a, i) => {
      if (i === v.ego) return;
      const x = at(a.x, f); if (x === null || x === undefined) return;
      const small = a.k === 1 || a.k === 3, mn = small ? 6 * px : 0;  // keep pedestrians and cones visible
      box(ctx, x, at(a.y, f), at(a.h, f), Math.max(a.l, mn), Math.max(a.w, mn), KIND_COLOR[a.k] || P.vehicle, i === hit ? P.hit : shade(KIND_COLOR[a.k] || P.vehicle), i === hit ? 3.5 * px : 1.2 * px, a.k !== 1 && a.k !== 3);
    });
    const e = v.agents[v.ego];
    if (ego[0] !== null) box(ctx, ego[0], ego[1], ego[2], e.l, e.w, P.ego, P.ego_edge, 2.2 * px, true);
    // screen-space overlays
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    scaleBar(ctx, w, h, z);
  }

  /** Incident strip of view ``v`` on the timeline context ``tctx`` with the cursor at frame ``f``. */
  function drawTimeline(tctx, BITS, v, f, dpr) {
    const W = tctx.canvas.width / dpr, H = tctx.canvas.height / dpr;
    tctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    tctx.clearRect(0, 0, W, H);
    tctx.fillStyle = "#e9edf2"; tctx.fillRect(0, 4, W, H - 8);
    const xw = (k) => (v.n > 1 ? (k / (v.n - 1)) * (W - 2) + 1 : 1);
    if (v.warmup > 0) { tctx.fillStyle = "#d3d9e1"; tctx.fillRect(0, 4, xw(v.warmup), H - 8); }
    const bw = Math.max(2, W / v.n);
    for (let k = 0; k < v.n; k++) {
      const fl = v.flags[k]; if (!fl) continue;
      tctx.fillStyle = fl & (BITS.collision | BITS.at_fault) ? "#dc2626" : fl & BITS.offroad ? "#d97706" : fl & BITS.red_light ? "#ef4444" : "#7c3aed";
      tctx.fillRect(xw(k) - bw / 2, 2, bw, H - 4);
    }
    let prev = -1;
    tctx.fillStyle = "#16a34a";
    v.dec.forEach((s, i) => { if (v.ti[i] !== prev && v.texts[v.ti[i]]) tctx.fillRect(xw(s) - 0.5, H - 4, 1.5, 4); prev = v.ti[i]; });
    tctx.fillStyle = "#0f172a"; tctx.fillRect(xw(f) - 1, 0, 2, H);
  }

  /** Fill the overlay element ``ov`` with the incident badges of frame flags ``fl``; true if any is shown. */
  function showFlags(ov, BITS, fl) {
    ov.textContent = "";
    let shown = false;
    for (const [bit, text] of FLAG_TEXT) {
      if (!(fl & BITS[bit]) || (bit === "collision" && fl & BITS.at_fault)) continue;
      const s = document.createElement("span"); s.textContent = text;
      if (bit === "wrong_way" || bit === "offroad") s.className = "warn";
      ov.appendChild(s); shown = true;
    }
    return shown;
  }

  /** Show the reasoning text of the decision in force at frame ``f`` in ``r`` (step info in ``meta``).
      ``st.lastText`` remembers the text shown last, so a new text flashes while ``playing``. */
  function showReasoning(r, meta, v, f, st, playing) {
    const d = decisionAt(v, f);
    if (d < 0) {
      r.textContent = f < v.warmup ? "Warm-up: the ego replays its log; the policy has not been called yet." : "No decision yet.";
      r.className = "reasoning none"; meta.textContent = ""; st.lastText = -1;
      return;
    }
    const txt = v.texts[v.ti[d]];
    meta.textContent = `· step ${v.dec[d]} (t = ${(v.dec[d] * v.dt).toFixed(1)} s)`;
    if (txt) {
      r.textContent = txt; r.className = "reasoning";
      if (st.lastText !== v.ti[d] && playing) { void r.offsetWidth; r.classList.add("fresh"); }
    } else { r.textContent = "This policy gives no reasoning text."; r.className = "reasoning none"; }
    st.lastText = v.ti[d];
  }

  return { buildGeometry, fitCamera, drawScene, drawTimeline, decisionAt, showFlags, showReasoning, FLAG_TEXT };
})();
