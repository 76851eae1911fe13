/* roadloop demo report: before/after replays of the held-out rollouts whose outcome post-training
   changed.  Each pair card has two canvas players (scene.js drawing) driven by one shared frame:
   one play/pause button, one scrub slider, one speed and camera setting (vanilla JS, no network). */
(function () {
  "use strict";
  const node = document.getElementById("demo-data");
  if (!node || typeof RoadloopScene === "undefined") return;
  const DATA = JSON.parse(node.textContent);
  const SC = RoadloopScene, P = DATA.palette, BITS = DATA.flag_bits;
  const root = document.documentElement;
  for (const k of ["ego", "vehicle", "pedestrian", "cyclist", "static", "plan", "route"]) root.style.setProperty("--" + k, P[k]);
  const FOLLOW_ZOOM = 5;

  function fit(c) {  // size the canvas backing store to its box; CSS px size
    const dpr = window.devicePixelRatio || 1, r = c.getBoundingClientRect();
    const w = Math.max(50, Math.round(r.width)), h = Math.max(10, Math.round(r.height));
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    return { w, h, dpr };
  }

  function makePlayer(el, v) {
    const canvas = el.querySelector("canvas.pscene"), tl = el.querySelector("canvas.ptimeline");
    return { el, v, geo: SC.buildGeometry(v), canvas, ctx: canvas.getContext("2d"), tl, tctx: tl.getContext("2d"),
             wrap: el.querySelector(".pcanvas-wrap"), ov: el.querySelector(".overlay-flags"),
             time: el.querySelector(".overlay-time"), r: el.querySelector(".reasoning"), meta: el.querySelector(".rmeta"),
             cam: { cx: 0, cy: 0, zoom: FOLLOW_ZOOM, follow: true }, lastText: -1 };
  }

  function setupPair(card, pd) {
    const q = (sel) => card.querySelector(sel);
    const players = [makePlayer(q('.pside[data-side="before"]'), pd.before), makePlayer(q('.pside[data-side="after"]'), pd.after)];
    const n = Math.max(pd.before.n, pd.after.n), dt = pd.before.dt || 0.1;
    const slider = q(".pair-slider"), playBtn = q(".pair-play"), frameLbl = q(".pair-frame"), timeLbl = q(".pair-time");
    const followBox = q(".pair-follow"), speedSel = q(".pair-speed");
    const S = { f: 0, playing: false, speed: 1, follow: true, zoom: FOLLOW_ZOOM, cx: 0, cy: 0, acc: 0, last: 0 };
    slider.max = String(n - 1);

    function drawPlayer(p) {
      const { w, h, dpr } = fit(p.canvas), f = Math.min(S.f, p.v.n - 1);
      fit(p.tl);
      p.cam.follow = S.follow; p.cam.zoom = S.zoom;
      if (!S.follow) { p.cam.cx = S.cx; p.cam.cy = S.cy; }  // one shared camera: same place, same scale
      SC.drawScene(p.ctx, P, p.v, p.geo, f, p.cam, w, h, dpr);
      SC.drawTimeline(p.tctx, BITS, p.v, f, dpr);
      const fl = p.v.flags[f] || 0, shown = SC.showFlags(p.ov, BITS, fl);
      p.wrap.classList.toggle("incident", shown && !!(fl & (BITS.collision | BITS.offroad)));
      p.time.textContent = `t = ${(f * p.v.dt).toFixed(1)} s`;
      SC.showReasoning(p.r, p.meta, p.v, f, p, S.playing);
      p.el.dataset.frame = String(f);
    }
    function draw() {
      players.forEach(drawPlayer);
      frameLbl.textContent = `${S.f} / ${n - 1}`;
      timeLbl.textContent = `t = ${(S.f * dt).toFixed(1)} s` + (S.f < Math.min(pd.before.warmup, pd.after.warmup) ? " · warm-up" : "");
      slider.value = String(S.f);
      card.dataset.frame = String(S.f);
    }
    function setFrame(f) { S.f = Math.max(0, Math.min(n - 1, f)); draw(); }
    function fitBoth() {
      const { w, h } = fit(players[0].canvas), cam = SC.fitCamera([pd.before, pd.after], w, h);
      S.cx = cam.cx; S.cy = cam.cy; S.zoom = cam.zoom;
    }
    function setPlaying(on) {
      S.playing = on; playBtn.classList.toggle("playing", on);
      playBtn.setAttribute("aria-label", on ? "pause" : "play");
      if (on) { if (S.f >= n - 1) setFrame(0); S.last = performance.now(); S.acc = 0; requestAnimationFrame(tick); }
    }
    function tick(now) {
      if (!S.playing) return;
      S.acc += (now - S.last) * S.speed; S.last = now;
      const step = dt * 1000;
      if (S.acc >= step) {
        const k = Math.floor(S.acc / step); S.acc -= k * step;
        if (S.f + k >= n - 1) { setFrame(n - 1); setPlaying(false); return; }
        setFrame(S.f + k);
      }
      requestAnimationFrame(tick);
    }

    playBtn.addEventListener("click", () => setPlaying(!S.playing));
    q(".pair-next").addEventListener("click", () => { setPlaying(false); setFrame(S.f + 1); });
    q(".pair-prev").addEventListener("click", () => { setPlaying(false); setFrame(S.f - 1); });
    slider.addEventListener("input", () => setFrame(+slider.value));
    speedSel.addEventListener("change", () => { S.speed = +speedSel.value; });
    followBox.addEventListener("change", () => {
      S.follow = followBox.checked;
      if (S.follow) S.zoom = FOLLOW_ZOOM; else fitBoth();
      draw();
    });
    q(".pair-zoom-in").addEventListener("click", () => { S.zoom = Math.min(60, S.zoom * 1.4); draw(); });
    q(".pair-zoom-out").addEventListener("click", () => { S.zoom = Math.max(0.3, S.zoom / 1.4); draw(); });
    for (const p of players) {
      p.tl.addEventListener("click", (e) => {
        const r = p.tl.getBoundingClientRect(); setPlaying(false);
        setFrame(Math.round(((e.clientX - r.left) / r.width) * (p.v.n - 1)));
      });
      if (window.ResizeObserver) new ResizeObserver(() => draw()).observe(p.canvas);
    }
    window.addEventListener("resize", draw);
    draw();
  }

  DATA.pairs.forEach((pd, i) => {
    const card = document.getElementById("pair-" + i);
    if (card) setupPair(card, pd);
  });
})();
