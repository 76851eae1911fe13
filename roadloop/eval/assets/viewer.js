/* roadloop report viewer: top-down replay of the embedded rollouts (vanilla JS, no network).
   The drawing itself lives in scene.js (RoadloopScene), inlined before this script. */
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
  const SC = RoadloopScene;

  const S = { vi: -1, v: null, f: 0, playing: false, speed: 1, follow: true, zoom: 6, cx: 0, cy: 0,
              acc: 0, last: 0, geo: null, lastText: -1 };

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
    const { w, h } = size(), cam = SC.fitCamera([S.v], w, h);
    S.cx = cam.cx; S.cy = cam.cy; S.zoom = cam.zoom;
  }
  function setFollow(on) { S.follow = on; followBox.checked = on; draw(); }

  // ---------------------------------------------------------------- drawing
  function draw() {
    const v = S.v; if (!v) return;
    const { w, h, dpr } = size();
    SC.drawScene(ctx, P, v, S.geo, S.f, S, w, h, dpr);
    updatePanels();
  }
  function drawTimeline() { SC.drawTimeline(tctx, BITS, S.v, S.f, window.devicePixelRatio || 1); }

  // ---------------------------------------------------------------- panels
  function updatePanels() {
    const v = S.v, f = S.f, fl = v.flags[f] || 0;
    $("frame-label").textContent = `${f} / ${v.n - 1}`;
    $("time-label").textContent = `t = ${(f * v.dt).toFixed(1)} s` + (f < v.warmup ? " · warm-up" : "");
    $("overlay-time").textContent = `t = ${(f * v.dt).toFixed(1)} s`;
    slider.value = String(f);
    for (const el of document.querySelectorAll("#checks .chip")) el.classList.toggle("on", !!(fl & BITS[el.dataset.bit]));
    const shown = SC.showFlags($("overlay-flags"), BITS, fl);
    $("canvas-wrap").classList.toggle("incident", shown && !!(fl & (BITS.collision | BITS.offroad)));
    const sp = v.speed[f];
    $("speed-val").textContent = sp === null ? "–" : sp.toFixed(1);
    $("speed-kmh").textContent = sp === null ? "" : `${(sp * 3.6).toFixed(0)} km/h`;
    SC.showReasoning($("reasoning"), $("reasoning-meta"), v, f, S, S.playing);
    drawTimeline();
  }
  function fmtMetric(k, x) {
    if (x === null || x === undefined) return "–";
    if (["collision_at_fault", "offroad", "red_light", "route_completion", "comfort_violation"].includes(k)) return x > 0 ? "yes" : "no";
    return x.toFixed(3);
  }
  function selectView(i) {
    const v = DATA.views[i]; if (!v) return;
    S.vi = i; S.v = v; S.geo = SC.buildGeometry(v); S.f = 0; S.lastText = -1;
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
