// The ich slice viewer: NiiVue draws the study; this file wires it to Streamlit and to PACS-like
// controls. Everything here runs in the browser: a step costs one WebGL draw, no server round trip.
// Only the slice the reader settles on goes back to Python (debounced), for the panels beside it.
"use strict";

(function () {
  const REPORT_DELAY_MS = 300; // after the last step: a reader scrolling through does not rerun the app
  const CINE_MS = 100; // 10 slices per second
  const HEATMAP_FLOOR = 51; // of 255: weaker attention stays transparent, as in the key image
  const HEATMAP_OPACITY = 0.5;

  const stage = document.getElementById("stage");
  const canvas = document.getElementById("gl");
  const preview = document.getElementById("preview");
  // NiiVue is 2 MB of script: loaded beside this one, so the server's preview shows before it is parsed.
  const niivueLoaded = new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "vendor/niivue.umd.js";
    script.onload = resolve;
    script.onerror = () => reject(new Error("the viewer's NiiVue script could not be loaded"));
    document.head.appendChild(script);
  });
  const hud = {
    slice: document.getElementById("hud-slice"),
    window: document.getElementById("hud-window"),
    probe: document.getElementById("hud-probe"),
    model: document.getElementById("hud-model"),
    status: document.getElementById("hud-status"),
  };

  const state = {
    nv: null,
    args: null,
    volumeId: null, // what the browser holds; Python sends the bytes only while these differ from its ids
    heatmapId: null,
    heatmapOn: true,
    gotoNonce: null,
    windowKey: null,
    windowName: "",
    slice: -1,
    reported: -1,
    seq: 0,
    reportTimer: null,
    cine: null,
    inputAt: null, // when the input that caused the pending step arrived (performance.now())
    loading: null,
  };
  // Read by the browser test: per-step latency and the drawn slice, without scraping pixels.
  // argsAt / imageAt / readyAt: when the first study arrived from the server, when its first image was shown
  // (the preview), when NiiVue drew it (scrolling works from then on); epoch ms, as the page's Date.now().
  const probe = {
    stepMs: [],
    windowMs: [],
    loadMs: null,
    argsAt: null,
    imageAt: null,
    readyAt: null,
    slice: null,
    level: null,
    width: null,
    loaded: false,
    errors: [],
  };
  window.ichViewer = probe;

  // ------------------------------------------------------------------ Streamlit component protocol
  function send(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data), "*");
  }
  function setHeight() {
    send("streamlit:setFrameHeight", { height: document.body.scrollHeight });
  }
  function sendValue() {
    send("streamlit:setComponentValue", {
      value: { slice: state.reported + 1, seq: state.seq, have: state.volumeId, have_heatmap: state.heatmapId },
      dataType: "json",
    });
  }
  function report() {
    if (state.slice === state.reported) return;
    state.reported = state.slice;
    state.seq += 1;
    sendValue();
  }
  // The bytes arrive in the session's websocket message: NiiVue loads them from a blob: URL, so no
  // request another client could repeat ever carries study data.
  function blobUrl(bytes) {
    return URL.createObjectURL(new Blob([bytes]));
  }

  // ------------------------------------------------------------------ geometry: slices by position
  function dot(a, b) {
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
  }
  // NiiVue works in RAS millimetres; a slice is found by its position along the series normal, so
  // the index is the stored one whatever order NiiVue keeps the voxels in.
  function currentSlice() {
    const args = state.args;
    const loc = dot(state.nv.frac2mm(state.nv.scene.crosshairPos), args.normal);
    let best = 0;
    for (let k = 1; k < args.locations.length; k++) {
      if (Math.abs(args.locations[k] - loc) < Math.abs(args.locations[best] - loc)) best = k;
    }
    return best;
  }
  function goSlice(k) {
    const args = state.args;
    k = Math.max(0, Math.min(args.n - 1, k));
    const mm = state.nv.frac2mm(state.nv.scene.crosshairPos);
    const d = args.locations[k] - dot(mm, args.normal);
    const target = [mm[0] + d * args.normal[0], mm[1] + d * args.normal[1], mm[2] + d * args.normal[2]];
    state.nv.scene.crosshairPos = state.nv.mm2frac(target);
    state.nv.drawScene();
    sliceChanged();
  }
  function step(delta) {
    goSlice(currentSlice() + delta);
  }

  // ------------------------------------------------------------------ what the overlays say
  function fmt(x, digits) {
    return x === null || x === undefined ? "?" : Number(x).toFixed(digits);
  }
  function showSlice() {
    const args = state.args;
    const k = state.slice;
    const where = args.positions[k] === null ? "" : `  ·  ${fmt(args.positions[k], 1)} mm`;
    const thick = args.thickness ? `  ·  ${fmt(args.thickness, 1)} mm thick` : "";
    const span = args.spans ? ` (slices ${args.spans[k][0]}–${args.spans[k][1]})` : "";
    hud.slice.textContent = `${args.unit} ${k + 1} / ${args.n}${span}${where}${thick}`;
    hud.model.textContent = args.notes[k] || "";
    probe.slice = k + 1;
  }
  function showWindow() {
    const v = state.nv.volumes[0];
    const width = v.cal_max - v.cal_min;
    const level = (v.cal_max + v.cal_min) / 2;
    probe.level = Math.round(level);
    probe.width = Math.round(width);
    const preset = Object.entries(state.args.presets).find(
      ([, p]) => Math.abs(p.level - level) < 0.5 && Math.abs(p.width - width) < 0.5
    );
    const heat = state.heatmapId ? `\nheatmap ${state.args.heatmap_label}${state.heatmapOn ? "" : " (hidden: H)"}` : "";
    hud.window.textContent = `W ${Math.round(width)}  L ${Math.round(level)}${preset ? `  (${preset[0]})` : ""}${heat}`;
  }
  function sliceChanged() {
    const k = currentSlice();
    if (state.inputAt !== null) {
      const t0 = state.inputAt;
      state.inputAt = null;
      // Two frames: the step is counted once the new slice has been handed to the compositor.
      requestAnimationFrame(() => requestAnimationFrame(() => probe.stepMs.push(performance.now() - t0)));
    }
    if (k === state.slice) return;
    state.slice = k;
    showSlice();
    clearTimeout(state.reportTimer);
    state.reportTimer = setTimeout(report, REPORT_DELAY_MS);
  }

  // ------------------------------------------------------------------ window / level, heatmap
  function setWindow(level, width) {
    const started = performance.now();
    const v = state.nv.volumes[0];
    v.cal_min = level - width / 2;
    v.cal_max = level + width / 2;
    // As NiiVue's own drag-windowing does: recolour the base layer only, not a full volume upload.
    state.nv.refreshLayers(v, 0);
    state.nv.drawScene();
    probe.windowMs.push(performance.now() - started);
    showWindow();
  }
  function preset(i) {
    const entries = Object.values(state.args.presets);
    if (i < entries.length) setWindow(entries[i].level, entries[i].width);
  }
  async function setHeatmap(id, bytes) {
    const nv = state.nv;
    while (nv.volumes.length > 1) nv.removeVolumeByIndex(1);
    state.heatmapId = id;
    if (id) {
      const url = blobUrl(bytes);
      try {
        await nv.addVolumeFromUrl({
          url: url,
          name: "heatmap.nii.gz",
          colormap: "inferno",
          cal_min: HEATMAP_FLOOR,
          cal_max: 255,
          opacity: state.heatmapOn ? HEATMAP_OPACITY : 0,
        });
      } finally {
        URL.revokeObjectURL(url);
      }
    }
    showWindow();
    sendValue();
  }
  function toggleHeatmap() {
    if (!state.heatmapId || state.nv.volumes.length < 2) return;
    state.heatmapOn = !state.heatmapOn;
    state.nv.setOpacity(1, state.heatmapOn ? HEATMAP_OPACITY : 0);
    showWindow();
  }
  function zoom(factor) {
    const pan = state.nv.scene.pan2Dxyzmm;
    pan[3] = Math.max(0.5, Math.min(8, pan[3] * factor));
    state.nv.drawScene();
  }
  function resetView() {
    state.nv.scene.pan2Dxyzmm = [0, 0, 0, 1];
    state.nv.drawScene();
  }
  function toggleCine() {
    if (state.cine) {
      clearInterval(state.cine);
      state.cine = null;
      return;
    }
    state.cine = setInterval(() => goSlice(currentSlice() + 1 >= state.args.n ? 0 : currentSlice() + 1), CINE_MS);
  }

  // ------------------------------------------------------------------ input
  const KEYS = {
    ArrowDown: () => step(1),
    ArrowRight: () => step(1),
    ArrowUp: () => step(-1),
    ArrowLeft: () => step(-1),
    PageDown: () => step(10),
    PageUp: () => step(-10),
    Home: () => goSlice(0),
    End: () => goSlice(state.args.n - 1),
    " ": toggleCine,
    "1": () => preset(0),
    "2": () => preset(1),
    "3": () => preset(2),
    h: toggleHeatmap,
    "+": () => zoom(1.25),
    "=": () => zoom(1.25),
    "-": () => zoom(0.8),
    "0": resetView,
    a: () => state.nv.setSliceType(state.nv.sliceTypeAxial),
    c: () => state.nv.setSliceType(state.nv.sliceTypeCoronal),
    s: () => state.nv.setSliceType(state.nv.sliceTypeSagittal),
  };
  // The page's own shortcuts (mark a slice, save the read, next unread) work while the image has the focus:
  // keys the viewer does not use go on to the Streamlit page, as if typed there.
  function forward(e) {
    try {
      const init = { key: e.key, code: e.code, ctrlKey: e.ctrlKey, metaKey: e.metaKey, altKey: e.altKey };
      Object.assign(init, { shiftKey: e.shiftKey, bubbles: true, cancelable: true });
      window.parent.document.dispatchEvent(new window.parent.KeyboardEvent("keydown", init));
    } catch (err) {
      // not same-origin (a proxy in between): the page's shortcuts need the focus on the page
    }
  }
  const STEP_KEYS = new Set(["ArrowDown", "ArrowRight", "ArrowUp", "ArrowLeft", "PageDown", "PageUp", "Home", "End"]);
  window.addEventListener(
    "keydown",
    (e) => {
      const action = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
      if (!action || e.ctrlKey || e.metaKey || e.altKey) {
        if (!["Tab", "Shift", "Control", "Alt", "Meta"].includes(e.key)) forward(e);
        return;
      }
      if (!probe.loaded) return;
      e.preventDefault();
      e.stopPropagation(); // NiiVue's own hotkeys (clip planes, 3-D) are not for this reading screen
      // Timed from the key to the drawn slice; a key that moves no slice
      // (a preset, the heatmap) must not leave its time behind for the next step to be measured from.
      state.inputAt = STEP_KEYS.has(e.key) ? performance.now() : null;
      action();
    },
    true
  );
  // The toolbar under the image: the same actions as the keys, for a mouse.
  document.querySelectorAll("#help button").forEach((button) =>
    button.addEventListener("click", () => {
      if (!probe.loaded) return;
      KEYS[button.dataset.key]();
      stage.focus({ preventScroll: true });
    })
  );
  stage.addEventListener(
    "wheel",
    (e) => {
      if (!probe.loaded) return;
      if (e.ctrlKey) {
        e.preventDefault();
        e.stopPropagation();
        zoom(e.deltaY < 0 ? 1.1 : 1 / 1.1);
        return;
      }
      state.inputAt = performance.now(); // NiiVue scrolls one slice per wheel event
    },
    { capture: true, passive: false }
  );
  stage.addEventListener("pointerdown", () => stage.focus({ preventScroll: true }));
  stage.addEventListener("pointermove", (e) => {
    if (!probe.loaded) return;
    if (e.buttons & 1) showWindow(); // left-drag windows (NiiVue's windowing mode)
    const nv = state.nv;
    const rect = canvas.getBoundingClientRect();
    const dpr = nv.uiData.dpr || window.devicePixelRatio || 1;
    const frac = nv.canvasPos2frac([(e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr]);
    if (!frac || frac[0] < 0) {
      hud.probe.textContent = "";
      return;
    }
    const vox = nv.frac2vox(frac);
    const hu = nv.volumes[0].getValue(vox[0], vox[1], vox[2]);
    hud.probe.textContent = Number.isFinite(hu) ? `HU ${Math.round(hu)}` : "";
  });
  stage.addEventListener("pointerup", () => probe.loaded && showWindow());
  stage.addEventListener("pointerleave", () => (hud.probe.textContent = ""));

  // ------------------------------------------------------------------ rendering the component's args
  // The plane the viewer opens on, as a PNG the server windowed: the first image while NiiVue loads.
  function showPreview(args) {
    const url = blobUrl(args.preview);
    hud.status.textContent = "";
    hud.slice.textContent = `${args.unit} ${args.goto} / ${args.n}  ·  loading the viewer…`;
    preview.onload = () => {
      URL.revokeObjectURL(url);
      if (probe.imageAt === null) requestAnimationFrame(() => (probe.imageAt = probe.imageAt ?? Date.now()));
    };
    preview.src = url;
    preview.hidden = false;
  }

  async function load(args) {
    await niivueLoaded;
    if (!state.nv) {
      const nv = new niivue.Niivue({
        isRadiologicalConvention: true, // the patient's right on the screen's left, as in PACS
        isOrientationTextVisible: true,
        showAllOrientationMarkers: true,
        crosshairWidth: 0,
        show3Dcrosshair: false,
        backColor: [0, 0, 0, 1],
        dragModePrimary: niivue.DRAG_MODE.windowing,
        dragMode: niivue.DRAG_MODE.windowing, // the wheel's fallback: scroll slices, never zoom
        isResizeCanvas: true,
        logLevel: "error",
        dragAndDropEnabled: false,
      });
      await nv.attachToCanvas(canvas);
      // Set after construction: NiiVue 0.69's constructor drops this option, and right-drag then windowed.
      nv.setMouseEventConfig({
        leftButton: { primary: niivue.DRAG_MODE.windowing },
        rightButton: niivue.DRAG_MODE.pan,
        centerButton: niivue.DRAG_MODE.pan,
      });
      nv.onLocationChange = () => probe.loaded && sliceChanged();
      state.nv = nv;
    }
    const nv = state.nv;
    if (preview.hidden) hud.status.textContent = "Loading the study…";
    probe.loaded = false;
    while (nv.volumes.length) nv.removeVolumeByIndex(0);
    const started = performance.now();
    const url = blobUrl(args.volume);
    try {
      await nv.loadVolumes([
        {
          url: url,
          name: "study.nii.gz",
          colormap: "gray",
          cal_min: args.window.level - args.window.width / 2,
          cal_max: args.window.level + args.window.width / 2,
          trustCalMinMax: true,
        },
      ]);
    } finally {
      URL.revokeObjectURL(url);
    }
    nv.setSliceType(nv.sliceTypeAxial);
    probe.loadMs = performance.now() - started;
    state.heatmapId = null;
    state.slice = -1;
    state.reported = args.goto - 1; // Python already shows this one
    state.windowKey = null;
    hud.status.textContent = "";
    probe.loaded = true;
    sendValue(); // Python leaves the bytes out from now on
  }

  // As tall as the screen allows below the viewer's top (measured once, unscrolled), never taller
  // than wide: a reading screen shows the whole slice without scrolling the page.
  function fitHeight() {
    let height = state.args.height;
    try {
      const top = window.frameElement.getBoundingClientRect().top;
      const help = document.getElementById("help").offsetHeight;
      height = Math.max(state.args.height, Math.min(window.parent.innerHeight - top - help - 12, stage.clientWidth));
    } catch (err) {
      // not same-origin (a proxy in between): keep the height Python asked for
    }
    stage.style.height = `${Math.round(height)}px`;
    setHeight();
  }

  async function render(args) {
    if (probe.argsAt === null && (args.volume || args.preview)) probe.argsAt = Date.now();
    const first = state.args === null;
    state.args = args;
    if (first) fitHeight();
    try {
      if (args.volume_id !== state.volumeId) {
        if (args.preview && !state.nv) showPreview(args);
        if (!args.volume) {
          // The first render (a preview only), or Python believes this page holds the study (the viewer was
          // redrawn): ask for the bytes. Python already shows the opening slice: no new slice to report.
          if (preview.hidden) hud.status.textContent = "Loading the study…";
          if (state.reported < 0) state.reported = args.goto - 1;
          state.volumeId = null;
          sendValue();
          return;
        }
        state.volumeId = args.volume_id; // renders arriving while it loads wait for this load
        state.gotoNonce = null;
        state.loading = load(args);
      }
      await state.loading;
      if (state.args !== args) return; // a newer render arrived meanwhile: it finishes the job
      const windowKey = `${args.window.name}:${args.window.level}:${args.window.width}`;
      if (windowKey !== state.windowKey) {
        state.windowKey = windowKey;
        setWindow(args.window.level, args.window.width);
      }
      const heatmapId = args.heatmap_id || null;
      if (heatmapId !== state.heatmapId) {
        if (heatmapId && !args.heatmap) {
          state.heatmapId = null;
          sendValue(); // as for the study: ask for the bytes
        } else {
          await setHeatmap(heatmapId, args.heatmap);
        }
      }
      if (args.goto_nonce !== state.gotoNonce) {
        const first = state.gotoNonce === null;
        state.gotoNonce = args.goto_nonce;
        goSlice(args.goto - 1);
        if (!first && window.frameElement) window.frameElement.scrollIntoView({ block: "center" });
      }
      showSlice();
      showWindow();
      preview.hidden = true; // NiiVue draws from here on
      if (probe.readyAt === null) {
        requestAnimationFrame(() => {
          probe.readyAt = Date.now();
          probe.imageAt = probe.imageAt ?? probe.readyAt;
        });
      }
    } catch (err) {
      probe.errors.push(String(err));
      hud.status.textContent = `The study could not be shown: ${err}`;
    }
  }

  window.addEventListener("message", (event) => {
    if (event.data && event.data.type === "streamlit:render") render(event.data.args);
  });
  window.addEventListener("resize", setHeight);
  try {
    window.parent.addEventListener("resize", () => state.args && fitHeight());
  } catch (err) {
    // see fitHeight
  }
  send("streamlit:componentReady", { apiVersion: 1 });
})();
