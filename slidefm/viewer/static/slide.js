"use strict";
// Slide page: OpenSeadragon with the slide and one Deep Zoom image per overlay stacked on it.
// URL options: ?overlay=<name>[,<name>…]&opacity=<0..1> (what is shown first).
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const sid = decodeURIComponent(location.pathname.split("/").pop());
const params = new URLSearchParams(location.search);
const fmt = (x, d = 3) => (typeof x === "number" ? x.toFixed(d) : esc(x));
const layerItems = {};  // overlay name -> OSD TiledImage
let expectedItems = Infinity;  // slide + overlays, known once the slide info is loaded

function setLegend(name, ov) {
  const lg = document.getElementById("legend"), ex = document.getElementById("export");
  if (!ov) { lg.hidden = true; ex.hidden = true; return; }
  if (ov.kind === "heatmap") {
    lg.hidden = false;
    document.getElementById("legend-label").textContent = ov.label;
    document.getElementById("legend-bar").style.background = `linear-gradient(to right, ${ov.colours.join(",")})`;
    document.getElementById("legend-low").textContent = ov.legend.low;
    document.getElementById("legend-high").textContent = ov.legend.high;
  } else { lg.hidden = true; }
  ex.hidden = !ov.exportable;
  ex.href = `/api/slides/${encodeURIComponent(sid)}/overlays/${name}.geojson`;
}

function overlayControls(viewer, info) {
  const box = document.getElementById("overlays");
  const want = (params.get("overlay") || "").split(",").filter(Boolean);
  expectedItems = 1 + Object.keys(info.overlays).length;
  const opacity0 = Math.min(1, Math.max(0, parseFloat(params.get("opacity") ?? "0.5")));
  Object.entries(info.overlays).forEach(([name, ov], i) => {
    const on = want.includes(name);
    const row = document.createElement("div");
    row.className = "ov";
    row.innerHTML = `<input type="checkbox" id="ov-${name}" ${on ? "checked" : ""}>` +
      `<label for="ov-${name}">${esc(ov.label)}</label>` +
      `<input type="range" min="0" max="1" step="0.05" value="${ov.kind === "outline" ? 1 : opacity0}" id="op-${name}" title="opacity">`;
    box.appendChild(row);
    const chk = row.querySelector("input[type=checkbox]"), rng = row.querySelector("input[type=range]");
    const apply = () => {
      const it = layerItems[name];
      if (it) it.setOpacity(chk.checked ? parseFloat(rng.value) : 0);
      if (chk.checked) setLegend(name, ov);
    };
    viewer.addTiledImage({
      tileSource: `/dz/${encodeURIComponent(sid)}/${name}.dzi`, index: i + 1, opacity: 0,
      success: (ev) => { layerItems[name] = ev.item; apply(); },
    });
    chk.addEventListener("change", apply);
    rng.addEventListener("input", apply);
  });
  const first = want.find((n) => info.overlays[n]);
  if (first) setLegend(first, info.overlays[first]);
}

function panel(info) {
  const p = info.properties;
  const rows = [
    ["vendor", p.vendor], ["size (level 0)", `${p.width} × ${p.height} px`],
    ["levels", p.level_dimensions.map((d, i) => `${i}: ${d[0]}×${d[1]} (÷${p.level_downsamples[i].toFixed(2)})`).join("<br>")],
    ["µm/px", p.mpp ? `${p.mpp[0].toFixed(4)} × ${p.mpp[1].toFixed(4)}` : "unknown"], ["µm/px from", p.mpp_source],
    ["objective", p.objective_power ?? "—"], ["reader", p.backend],
  ];
  if (info.features) rows.push(["tiles kept", info.features.num_tiles], ["tile encoder", `${info.features.encoder} (${info.features.encoder_weights})`],
    ["tile side (level 0)", `${info.features.patch_size_level0} px at ${info.features.target_mpp} µm/px`]);
  Object.entries(info.labels || {}).forEach(([k, v]) => rows.push([k, v]));
  document.getElementById("props").innerHTML = rows.map(([k, v]) => `<tr><td class="muted">${esc(k)}</td><td>${k === "levels" ? v : esc(v)}</td></tr>`).join("");
  const m = info.mil;
  if (m) {
    document.getElementById("mil").className = "";
    document.getElementById("mil").innerHTML = (m.random_weights ? `<p class="random">RANDOM WEIGHTS: this MIL model was never trained</p>` : "") +
      `<p><b>${esc(m.prediction)}</b> p=${fmt(m.probability)} (${esc(m.model)}, ${esc(m.score)})</p>` +
      Object.entries(m.probabilities).map(([c, v]) => `<div>${esc(c)} <span class="bar" style="width:${Math.round(v * 120)}px"></span> ${fmt(v)}</div>`).join("");
  }
  const z = info.zero_shot;
  if (z && z.probabilities) {
    document.getElementById("zeroshot").className = "";
    document.getElementById("zeroshot").innerHTML = (z.random_weights ? `<p class="random">RANDOM slide-encoder weights</p>` : "") +
      `<p><b>${esc(z.prediction)}</b> (prompts: ${esc(z.prompts)})</p>` +
      Object.entries(z.probabilities).map(([c, v]) => `<div>${esc(c)} <span class="bar" style="width:${Math.round(v * 120)}px"></span> ${fmt(v)}</div>`).join("");
  }
  if (info.retrieval) {
    document.getElementById("retrieval").className = "";
    document.getElementById("retrieval").innerHTML = info.retrieval.map((r) =>
      `<div><b>#${r.rank}</b> case ${esc(r.case_id)}${r.own_case ? " (this patient)" : ""} — cos ${fmt(r.similarity)}<div class="report">${esc(r.report)}</div></div>`).join("");
  }
  const errs = Object.entries(info.errors || {}).map(([k, v]) => `${k}: ${v}`);
  if (info.encode_error) errs.push("encode-slides: " + info.encode_error);
  if (errs.length) { const e = document.getElementById("error"); e.hidden = false; e.textContent = errs.join("\n"); }
}

async function main() {
  const res = await fetch(`/api/slides/${encodeURIComponent(sid)}`);
  const info = await res.json();
  document.getElementById("title").textContent = sid;
  if (!res.ok || info.open_error) {
    const e = document.getElementById("error"); e.hidden = false;
    e.textContent = info.open_error || info.detail || res.statusText; return;
  }
  const viewer = OpenSeadragon({
    id: "osd", prefixUrl: "/static/openseadragon/images/", tileSources: info.dzi,
    drawer: "canvas", showNavigator: true, crossOriginPolicy: false, imageSmoothingEnabled: false,
    animationTime: 0.3, maxZoomPixelRatio: 4,
  });
  window.slidefmViewer = viewer;
  viewer.addOnceHandler("open", () => overlayControls(viewer, info));
  panel(info);
}
// True once every visible image (slide and shown overlays) has all its tiles drawn.
window.slidefmReady = () => {
  const v = window.slidefmViewer;
  if (!v || !v.world || v.world.getItemCount() < expectedItems) return false;
  for (let i = 0; i < v.world.getItemCount(); i++) {
    const it = v.world.getItemAt(i);
    if (it.getOpacity() > 0 && !it.getFullyLoaded()) return false;
  }
  return true;
};
main();
