/* roadloop report viewer: top-down replay of the embedded rollouts (vanilla JS, no network). */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const P = DATA.palette;
  const BITS = DATA.flag_bits;
  const root = document.documentElement;
  for (const k of ["ego", "vehicle", "pedestrian", "cyclist", "static", "plan", "route"]) root.style.setProperty("--" + k, P[k]);
  const canvas = document.getElementById("scene");
  if (!canvas || !DATA.views.length) return;
  const $ = (id) => document.getElementById(id);
  const ctx = canvas.getContext("2d");
  const tl = $("timeline"), tctx = tl.getContext("2d");
  const slider = $("frame-slider"), playBtn = $("btn-play"), followBox = $("follow-toggle");
  const KIND_COLOR = [P.vehicle, P.pedestrian, P.cyclist, P.static];
  const FLAG_TEXT = [["at_fault", "AT-FAULT COLLISION"], ["collision", "COLLISION"], ["offroad", "OFF-ROAD"],
                     ["red_light", "RED LIGHT"], ["wrong_way", "WRONG WAY"]];

  const S = { vi: -1, v: null, f: 0, playing: false, speed: 1, follow: true, zoom: 6, cx: 0, cy: 0,
              acc: 0, last: 0, geo: null, lastText: -1 };

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
  function size() {
    const dpr = window.devicePixelRatio || 1, r = canvas.getBoundingClientRect();
    const w = Math.max(50, Math.round(r.width)), h = Math.max(50, Math.round(r.height));
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    const tr = tl.getBoundingClientRect();
    if (tl.width !== Math.round(tr.width * dpr)) { tl.width = Math.round(tr.width * dpr); tl.height = Math.round(tr.height * dpr); }
    return { w, h, dpr };
  }
  function fitScene() {
    const v = S.v, { w, h } = size();
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const a of v.agents) {
      const xs = Array.isArray(a.x) ? a.x : [a.x], ys = Array.isArray(a.y) ? a.y : [a.y];
      xs.forEach((x, i) => { if (x !== null) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, ys[i]); y1 = Math.max(y1, ys[i]); } });
    }
    const m = 15;
    S.cx = (x0 + x1) / 2; S.cy = (y0 + y1) / 2;
    S.zoom = Math.max(0.3, Math.min(40, Math.min(w / (x1 - x0 + 2 * m), h / (y1 - y0 + 2 * m))));
  }
  function setFollow(on) { S.follow = on; followBox.checked = on; draw(); }

  // ---------------------------------------------------------------- drawing
  function draw() {
    const v = S.v; if (!v) return;
    const g = S.geo, f = S.f, { w, h, dpr } = size();
    const ego = g.ego[f];
    if (S.follow && ego[0] !== null) { S.cx = ego[0]; S.cy = ego[1]; }
    const z = S.zoom, px = 1 / z;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = P.ground; ctx.fillRect(0, 0, w, h);
    ctx.setTransform(z * dpr, 0, 0, -z * dpr, dpr * (w / 2 - S.cx * z), dpr * (h / 2 + S.cy * z));
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
    const d = decisionAt(f);
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
      box(x, at(a.y, f), at(a.h, f), Math.max(a.l, mn), Math.max(a.w, mn), KIND_COLOR[a.k] || P.vehicle, i === hit ? P.hit : shade(KIND_COLOR[a.k] || P.vehicle), i === hit ? 3.5 * px : 1.2 * px, a.k !== 1 && a.k !== 3);
    });
    const e = v.agents[v.ego];
    if (ego[0] !== null) box(ego[0], ego[1], ego[2], e.l, e.w, P.ego, P.ego_edge, 2.2 * px, true);
    // screen-space overlays
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    scaleBar(w, h, z);
    updatePanels();
  }
  function shade(hex) {
    const n = parseInt(hex.slice(1), 16), r = (n >> 16) * 0.6, gg = ((n >> 8) & 255) * 0.6, b = (n & 255) * 0.6;
    return `rgb(${r | 0},${gg | 0},${b | 0})`;
  }
  function box(x, y, hd, l, wd, fill, stroke, lw, nose) {
    ctx.save(); ctx.translate(x, y); ctx.rotate(hd);
    ctx.fillStyle = fill; ctx.strokeStyle = stroke; ctx.lineWidth = lw;
    ctx.beginPath(); ctx.rect(-l / 2, -wd / 2, l, wd); ctx.fill(); ctx.stroke();
    if (nose) { // windscreen mark shows the heading
      ctx.fillStyle = "rgba(255,255,255,0.75)";
      ctx.beginPath(); ctx.rect(l / 2 - Math.min(1.3, l * 0.3), -wd / 2 + wd * 0.15, Math.min(0.55, l * 0.12), wd * 0.7); ctx.fill();
    }
    ctx.restore();
  }
  function scaleBar(w, h, z) {
    const targets = [1, 2, 5, 10, 20, 50, 100, 200, 500];
    let m = targets[0]; for (const t of targets) if (t * z <= 120) m = t;
    const L = m * z, x = 12, y = h - 14;
    ctx.strokeStyle = "#334155"; ctx.lineWidth = 2; ctx.lineCap = "butt";
    ctx.beginPath(); ctx.moveTo(x, y - 4); ctx.lineTo(x, y); ctx.lineTo(x + L, y); ctx.lineTo(x + L, y - 4); ctx.stroke();
    ctx.fillStyle = "#334155"; ctx.font = "11px sans-serif"; ctx.fillText(m + " m", x + L + 5, y + 1);
  }
  function drawTimeline() {
    const v = S.v, dpr = window.devicePixelRatio || 1, W = tl.width / dpr, H = tl.height / dpr;
    tctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    tctx.clearRect(0, 0, W, H);
    tctx.fillStyle = "#e9edf2"; tctx.fillRect(0, 4, W, H - 8);
    const xw = (f) => (v.n > 1 ? (f / (v.n - 1)) * (W - 2) + 1 : 1);
    if (v.warmup > 0) { tctx.fillStyle = "#d3d9e1"; tctx.fillRect(0, 4, xw(v.warmup), H - 8); }
    const bw = Math.max(2, W / v.n);
    for (let f = 0; f < v.n; f++) {
      const fl = v.flags[f]; if (!fl) continue;
      tctx.fillStyle = fl & (BITS.collision | BITS.at_fault) ? "#dc2626" : fl & BITS.offroad ? "#d97706" : fl & BITS.red_light ? "#ef4444" : "#7c3aed";
      tctx.fillRect(xw(f) - bw / 2, 2, bw, H - 4);
    }
    let prev = -1;
    tctx.fillStyle = "#16a34a";
    v.dec.forEach((s, i) => { if (v.ti[i] !== prev && v.texts[v.ti[i]]) tctx.fillRect(xw(s) - 0.5, H - 4, 1.5, 4); prev = v.ti[i]; });
    tctx.fillStyle = "#0f172a"; tctx.fillRect(xw(S.f) - 1, 0, 2, H);
  }

  // ---------------------------------------------------------------- panels
  function decisionAt(f) {
    const dec = S.v.dec; let lo = 0, hi = dec.length - 1, ans = -1;
    while (lo <= hi) { const m = (lo + hi) >> 1; if (dec[m] <= f) { ans = m; lo = m + 1; } else hi = m - 1; }
    return ans;
  }
  function updatePanels() {
    const v = S.v, f = S.f, fl = v.flags[f] || 0;
    $("frame-label").textContent = `${f} / ${v.n - 1}`;
    $("time-label").textContent = `t = ${(f * v.dt).toFixed(1)} s` + (f < v.warmup ? " · warm-up" : "");
    $("overlay-time").textContent = `t = ${(f * v.dt).toFixed(1)} s`;
    slider.value = String(f);
    for (const el of document.querySelectorAll("#checks .chip")) el.classList.toggle("on", !!(fl & BITS[el.dataset.bit]));
    const ov = $("overlay-flags"); ov.textContent = "";
    let shown = false;
    for (const [bit, text] of FLAG_TEXT) {
      if (!(fl & BITS[bit]) || (bit === "collision" && fl & BITS.at_fault)) continue;
      const s = document.createElement("span"); s.textContent = text;
      if (bit === "wrong_way" || bit === "offroad") s.className = "warn";
      ov.appendChild(s); shown = true;
    }
    $("canvas-wrap").classList.toggle("incident", shown && !!(fl & (BITS.collision | BITS.offroad)));
    const sp = v.speed[f];
    $("speed-val").textContent = sp === null ? "–" : sp.toFixed(1);
    $("speed-kmh").textContent = sp === null ? "" : `${(sp * 3.6).toFixed(0)} km/h`;
    const d = decisionAt(f), r = $("reasoning");
    if (d < 0) {
      r.textContent = f < v.warmup ? "Warm-up: the ego replays its log; the policy has not been called yet." : "No decision yet.";
      r.className = "reasoning none"; $("reasoning-meta").textContent = ""; S.lastText = -1;
    } else {
      const txt = v.texts[v.ti[d]];
      $("reasoning-meta").textContent = `· step ${v.dec[d]} (t = ${(v.dec[d] * v.dt).toFixed(1)} s)`;
      if (txt) {
        r.textContent = txt; r.className = "reasoning";
        if (S.lastText !== v.ti[d] && S.playing) { void r.offsetWidth; r.classList.add("fresh"); }
      } else { r.textContent = "This policy gives no reasoning text."; r.className = "reasoning none"; }
      S.lastText = v.ti[d];
    }
    drawTimeline();
  }
  function fmtMetric(k, x) {
    if (x === null || x === undefined) return "–";
    if (["collision_at_fault", "offroad", "red_light", "route_completion", "comfort_violation"].includes(k)) return x > 0 ? "yes" : "no";
    return x.toFixed(3);
  }
  function selectView(i) {
    const v = DATA.views[i]; if (!v) return;
    S.vi = i; S.v = v; S.geo = buildGeometry(v); S.f = 0; S.lastText = -1;
    slider.max = String(v.n - 1);
    $("v-title").textContent = v.scenario_id;
    $("v-status").innerHTML = v.failed ? '<span class="tag tag-fail">failed</span>' : "";
    $("v-sub").textContent = `${v.family} · seed ${v.seed} · ${v.policy} · ${v.n - 1} steps` + (v.failed ? ` · ${v.reason}` : "");
    const kv = $("v-metrics"); kv.textContent = "";
    const names = { score: "score", nuplan_score: "nuPlan score", progress: "progress", collision_at_fault: "at-fault collision",
                    offroad: "off-road", red_light: "red light", route_completion: "route completed", comfort_violation: "comfort violation" };
    for (const [k, lbl] of Object.entries(names)) {
      if (!(k in v.metrics)) continue;
      const dt = document.createElement("dt"); dt.textContent = lbl;
      const dd = document.createElement("dd"); dd.textContent = fmtMetric(k, v.metrics[k]);
      kv.append(dt, dd);
    }
    document.querySelectorAll("#rollout-table tr[data-view]").forEach((tr) => tr.classList.toggle("selected", +tr.dataset.view === i));
    if (!S.follow) fitScene(); else S.zoom = 6;
    if (history.replaceState) history.replaceState(null, "", "#r=" + i);
    draw();
  }
  function setFrame(f) { S.f = Math.max(0, Math.min(S.v.n - 1, f)); draw(); }
  function setPlaying(on) {
    S.playing = on; playBtn.classList.toggle("playing", on);
    playBtn.setAttribute("aria-label", on ? "pause" : "play");
    if (on) { if (S.f >= S.v.n - 1) setFrame(0); S.last = performance.now(); S.acc = 0; requestAnimationFrame(tick); }
  }
  function tick(now) {
    if (!S.playing) return;
    S.acc += (now - S.last) * S.speed; S.last = now;
    const step = S.v.dt * 1000;
    if (S.acc >= step) {
      const k = Math.floor(S.acc / step); S.acc -= k * step;
      if (S.f + k >= S.v.n - 1) { setFrame(S.v.n - 1); setPlaying(false); return; }
      setFrame(S.f + k);
    }
    requestAnimationFrame(tick);
  }
  function zoomBy(fac, sx, sy) {
    const { w, h } = size();
    const nz = Math.max(0.3, Math.min(60, S.zoom * fac));
    if (!S.follow && sx !== undefined) { // keep the point under the cursor fixed
      const wx = S.cx + (sx - w / 2) / S.zoom, wy = S.cy - (sy - h / 2) / S.zoom;
      S.cx = wx - (sx - w / 2) / nz; S.cy = wy + (sy - h / 2) / nz;
    }
    S.zoom = nz; draw();
  }

  // ---------------------------------------------------------------- events
  $("btn-next").addEventListener("click", () => { setPlaying(false); setFrame(S.f + 1); });
  $("btn-prev").addEventListener("click", () => { setPlaying(false); setFrame(S.f - 1); });
  playBtn.addEventListener("click", () => setPlaying(!S.playing));
  slider.addEventListener("input", () => { setFrame(+slider.value); });
  $("speed-select").addEventListener("change", (e) => { S.speed = +e.target.value; });
  followBox.addEventListener("change", () => { if (!followBox.checked) fitScene(); else S.zoom = 6; setFollow(followBox.checked); });
  $("btn-zoom-in").addEventListener("click", () => zoomBy(1.4));
  $("btn-zoom-out").addEventListener("click", () => zoomBy(1 / 1.4));
  $("btn-fit").addEventListener("click", () => { S.follow = false; followBox.checked = false; fitScene(); draw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault(); const r = canvas.getBoundingClientRect();
    zoomBy(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY }; canvas.classList.add("dragging"); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (S.follow && Math.hypot(dx, dy) < 3) return;
    if (S.follow) { S.follow = false; followBox.checked = false; }
    S.cx -= dx / S.zoom; S.cy += dy / S.zoom; drag = { x: e.clientX, y: e.clientY }; draw();
  });
  const endDrag = () => { drag = null; canvas.classList.remove("dragging"); };
  canvas.addEventListener("pointerup", endDrag); canvas.addEventListener("pointercancel", endDrag);
  tl.addEventListener("click", (e) => {
    const r = tl.getBoundingClientRect(); setPlaying(false);
    setFrame(Math.round(((e.clientX - r.left) / r.width) * (S.v.n - 1)));
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "SELECT" || (t.tagName === "INPUT" && t.type !== "range" && t.type !== "checkbox"))) return;
    if (e.key === "ArrowRight") { e.preventDefault(); setPlaying(false); setFrame(S.f + (e.shiftKey ? 10 : 1)); }
    else if (e.key === "ArrowLeft") { e.preventDefault(); setPlaying(false); setFrame(S.f - (e.shiftKey ? 10 : 1)); }
    else if (e.key === " " && !(t && t.tagName === "BUTTON")) { e.preventDefault(); setPlaying(!S.playing); }
    else if (e.key === "+" || e.key === "=") zoomBy(1.4);
    else if (e.key === "-") zoomBy(1 / 1.4);
    else if (e.key === "f") setFollow(!S.follow);
    else if (e.key === "Home") setFrame(0);
    else if (e.key === "End") setFrame(S.v.n - 1);
  });
  document.querySelectorAll("#rollout-table tr[data-view]").forEach((tr) => {
    const go = () => { setPlaying(false); selectView(+tr.dataset.view); };
    tr.addEventListener("click", go);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  });
  if (window.ResizeObserver) new ResizeObserver(() => draw()).observe(canvas);
  window.addEventListener("resize", draw);
  const m = /#r=(\d+)/.exec(location.hash);
  selectView(m && +m[1] < DATA.views.length ? +m[1] : 0);
})();
