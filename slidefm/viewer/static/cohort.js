"use strict";
// Cohort table: one row per slide, sortable by any column, a row opens the slide.
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

async function main() {
  const data = await (await fetch("/api/cohort")).json();
  const cols = [
    {key: "thumb", label: "", value: () => ""},
    {key: "slide_id", label: "slide", value: (r) => r.slide_id},
    ...data.labels.map((c) => ({key: "l:" + c, label: c, value: (r) => r.labels[c]})),
    {key: "tiles", label: "tiles", value: (r) => r.num_tiles},
    {key: "mil", label: "MIL prediction", value: (r) => r.mil ? `${r.mil.prediction} (${r.mil.probability.toFixed(3)})${r.mil.random_weights ? " [random weights]" : ""}` : ""},
    {key: "zs", label: "zero-shot", value: (r) => r.zero_shot ? `${r.zero_shot.prediction} (${r.zero_shot.probability.toFixed(3)})` : ""},
    {key: "err", label: "errors", value: (r) => [r.open_error && "open: " + r.open_error, r.encode_error && "encode-slides: " + r.encode_error, ...Object.entries(r.errors || {}).map(([k, v]) => k + ": " + v)].filter(Boolean).join("; ")},
  ];
  let sortKey = "slide_id", asc = true;
  const thead = document.querySelector("#cohort thead"), tbody = document.querySelector("#cohort tbody");
  function render() {
    const col = cols.find((c) => c.key === sortKey);
    const rows = [...data.slides].sort((a, b) => {
      const x = col.value(a), y = col.value(b);
      const c = (typeof x === "number" && typeof y === "number") ? x - y : String(x ?? "").localeCompare(String(y ?? ""), undefined, {numeric: true});
      return asc ? c : -c;
    });
    thead.innerHTML = "<tr>" + cols.map((c) => `<th data-key="${esc(c.key)}">${esc(c.label)}${c.key === sortKey ? (asc ? " ▲" : " ▼") : ""}</th>`).join("") + "</tr>";
    tbody.innerHTML = rows.map((r) => `<tr data-id="${esc(r.slide_id)}">` + cols.map((c) => c.key === "thumb"
      ? `<td>${r.open_error ? "" : `<img loading="lazy" alt="" src="/api/slides/${encodeURIComponent(r.slide_id)}/thumbnail.jpg">`}</td>`
      : `<td class="${c.key === "err" ? "error" : ""}">${esc(c.value(r))}</td>`).join("") + "</tr>").join("");
  }
  thead.addEventListener("click", (ev) => {
    const k = ev.target.closest("th")?.dataset.key;
    if (!k || k === "thumb") return;
    asc = k === sortKey ? !asc : true; sortKey = k; render();
  });
  tbody.addEventListener("click", (ev) => {
    const id = ev.target.closest("tr")?.dataset.id;
    if (id) location.href = "/slide/" + encodeURIComponent(id);
  });
  render();
}
main();
