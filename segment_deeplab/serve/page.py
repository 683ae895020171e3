"""The page at `GET /`: drop or pick an image, see its overlay and a legend of the classes.

One self-contained HTML document (inline CSS and JS, nothing fetched from elsewhere), so
it works offline and behind any proxy. It posts the image twice at once, for the JSON
(the legend: names, colours, shares) and the overlay; the two requests are the same
size, so the server's batcher usually runs them in one forward pass. Stable ids for
tests and scripts: #drop, #file, #status, #overlay, #legend (one `li` per class
present, with `.name` and `.share`), #meta.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>segment-deeplab</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
         padding: 16px; color: #222; }
  h1 { font-size: 20px; margin: 0 0 12px; }
  #drop { display: block; border: 2px dashed #999; border-radius: 8px; padding: 28px;
          text-align: center; cursor: pointer; color: #555; }
  #drop.over { border-color: #2a6; background: #efe; }
  #file { display: none; }
  #status { margin: 10px 0; min-height: 1.4em; }
  #status.error { color: #b00; }
  #result { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
  #overlay { max-width: 100%; display: none; border: 1px solid #ddd; }
  #overlay.shown { display: block; }
  #legend { list-style: none; padding: 0; margin: 0; min-width: 220px; }
  #legend li { display: flex; align-items: center; gap: 8px; padding: 2px 0; }
  .swatch { width: 16px; height: 16px; border: 1px solid #000; flex: none; }
  .name { flex: 1; }
  .share { font-variant-numeric: tabular-nums; color: #555; }
  #meta { color: #666; font-size: 13px; }
</style>
</head>
<body>
<h1>segment-deeplab</h1>
<label id="drop" for="file">Drop an image here, or click to pick one</label>
<input id="file" type="file" accept="image/*">
<div id="status"></div>
<div id="result">
  <img id="overlay" alt="overlay of the predicted classes">
  <div><ul id="legend"></ul><p id="meta"></p></div>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const drop = $("drop"), file = $("file"), overlay = $("overlay"), legend = $("legend");

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function post(image, output) {
  const body = new FormData();
  body.append("file", image, image.name || "image");
  const r = await fetch("predict?output=" + output, { method: "POST", body });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try {
      const detail = (await r.json()).detail;
      msg = typeof detail === "string" ? detail : JSON.stringify(detail);
    } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(msg);
  }
  return r;
}

function row(c) {
  const li = document.createElement("li");
  li.dataset.id = c.id;
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.background = "rgb(" + c.color.join(",") + ")";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = c.name;
  const share = document.createElement("span");
  share.className = "share";
  share.textContent = (100 * c.share).toFixed(1) + "%";
  li.append(swatch, name, share);
  return li;
}

function showLegend(result) {
  const present = result.classes.filter((c) => c.pixels > 0);
  present.sort((a, b) => b.share - a.share);
  legend.replaceChildren(...present.map(row));
  const t = result.timing;
  $("meta").textContent = result.width + " x " + result.height + " px; forward " +
    t.forward_ms.toFixed(0) + " ms (batch of " + result.batch + "), total " +
    t.total_ms.toFixed(0) + " ms";
}

async function send(image) {
  status("segmenting " + (image.name || "the image") + " ...");
  legend.replaceChildren();
  $("meta").textContent = "";
  try {
    const [json, jpeg] = await Promise.all([post(image, "json"), post(image, "overlay")]);
    const result = await json.json();
    const blob = await jpeg.blob();
    if (overlay.src) URL.revokeObjectURL(overlay.src);
    overlay.src = URL.createObjectURL(blob);
    overlay.className = "shown";
    showLegend(result);
    status(image.name || "");
  } catch (e) {
    status(e.message, true);
  }
}

file.addEventListener("change", () => { if (file.files[0]) send(file.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const image = e.dataTransfer.files[0];
  if (image) send(image);
});
</script>
</body>
</html>
"""
