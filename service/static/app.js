// captioner web page: upload an image, show its captions and the attention map of each word.
// Plain browser JavaScript, no build step. Talks to POST /v1/captions with attention=true.
"use strict";

const $ = (selector) => document.querySelector(selector);

const page = {
  result: null, // the last CaptionResponse
  word: 0, // index of the word whose attention map is shown
  photoUrl: null, // object URL of the uploaded file (revoked on the next upload)
};

// ---------------------------------------------------------------------------------------------------------
// Upload.

function decodingParams() {
  const params = new FormData();
  params.set("method", $("#method").value);
  params.set("beam_size", $("#beam-size").value);
  params.set("num_captions", $("#num-captions").value);
  params.set("temperature", $("#temperature").value);
  params.set("attention", "true");
  return params;
}

// The API key, when the server requires one (CAPTIONER_API_KEYS): typed once, kept in this browser's localStorage.
const API_KEY_STORAGE = "captioner.apiKey";

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function rememberApiKey() {
  try {
    const key = $("#api-key").value.trim();
    if (key) localStorage.setItem(API_KEY_STORAGE, key);
    else localStorage.removeItem(API_KEY_STORAGE);
  } catch (err) {
    // Storage disabled (private mode, file://): the key still works for this visit.
  }
}

function restoreApiKey() {
  try {
    $("#api-key").value = localStorage.getItem(API_KEY_STORAGE) || "";
  } catch (err) {
    // as above
  }
}

async function caption(file) {
  if (!file) return;
  if (page.photoUrl) URL.revokeObjectURL(page.photoUrl);
  page.photoUrl = URL.createObjectURL(file);
  setState("busy", `Captioning ${file.name} …`);

  const form = decodingParams();
  form.set("image", file, file.name);
  let response, body;
  try {
    response = await fetch("/v1/captions", { method: "POST", body: form, headers: authHeaders() });
    body = await response.json();
  } catch (err) {
    setState("error", `The server did not answer (${err.message}).`);
    return;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: response.status, message: response.statusText };
    const hint = response.status === 401 ? " (enter the server's key in the API key field)" : "";
    setState("error", `${response.status} ${error.code}: ${error.message}${hint}`);
    return;
  }
  page.result = body;
  page.word = 0;
  // Draw once the image is laid out: the heat map takes the displayed image's size.
  const photo = $("#photo");
  photo.onload = () => {
    render(body);
    setState("done", "");
  };
  photo.onerror = () => {
    // Captioned, but a format this browser cannot display (e.g. TIFF): show the words without the picture.
    render(body);
    setState("done", "This browser cannot display the image, so the attention maps have nothing to cover.");
  };
  photo.src = page.photoUrl;
}

function setState(state, message) {
  document.body.dataset.state = state;
  const status = $("#status");
  status.textContent = message;
  status.className = state === "error" ? "error" : "";
}

// ---------------------------------------------------------------------------------------------------------
// Rendering.

function render(result) {
  $("#result").hidden = false;
  $("#caption").textContent = result.caption;

  const words = $("#words");
  words.replaceChildren(
    ...result.attention.tokens.map((token, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = token === "<end>" ? "word end" : "word";
      button.textContent = token;
      button.setAttribute("role", "option");
      button.addEventListener("mouseenter", () => showWord(i));
      button.addEventListener("focus", () => showWord(i));
      button.addEventListener("click", () => showWord(i));
      return button;
    }),
  );

  $("#candidates").replaceChildren(
    ...result.candidates.map((candidate) => {
      const item = document.createElement("li");
      const text = document.createElement("span");
      text.textContent = candidate.caption;
      const score = document.createElement("span");
      score.className = "logprob";
      score.textContent = `log p ${candidate.log_prob.toFixed(2)}`;
      item.append(text, score);
      return item;
    }),
  );

  const d = result.decoding;
  const how = d.method === "beam" ? `beam search, K=${d.beam_size}` : d.method === "sample" ? `sampling, T=${d.temperature}` : "greedy";
  const t = result.timing_ms;
  $("#timing").textContent =
    `${how} · ${Math.round(t.total)} ms (model ${Math.round(t.inference)} ms, batch of ${result.batch_size}) · ` +
    `${result.model.name} ${result.model.version}`;
  showWord(page.word);
}

function showWord(index) {
  const attention = page.result && page.result.attention;
  if (!attention) return;
  page.word = Math.max(0, Math.min(index, attention.tokens.length - 1));
  document.querySelectorAll("#words .word").forEach((el, i) => {
    el.classList.toggle("active", i === page.word);
    el.setAttribute("aria-selected", i === page.word ? "true" : "false");
  });
  const beta = attention.betas[page.word];
  $("#word-info").textContent =
    `${page.word + 1}/${attention.tokens.length} “${attention.tokens[page.word]}” · gate β ${beta.toFixed(2)}`;
  drawHeatmap(attention.weights[page.word], attention.grid);
}

// The grid's weights go onto a canvas of grid size (one pixel per location), which is then drawn scaled up to the
// image with smoothing on: the browser's bilinear upsampling, as in the paper's figures. The model sees the
// whole image squashed to a square, so the grid spans the whole image whatever its aspect ratio.
function drawHeatmap(weights, grid) {
  const photo = $("#photo");
  const canvas = $("#heatmap");
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.round(photo.clientWidth * scale);
  canvas.height = Math.round(photo.clientHeight * scale);
  canvas.style.width = `${photo.clientWidth}px`;
  canvas.style.height = `${photo.clientHeight}px`;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!$("#show-heatmap").checked) return;

  const small = document.createElement("canvas");
  small.width = grid.width;
  small.height = grid.height;
  const cells = small.getContext("2d").createImageData(grid.width, grid.height);
  const peak = Math.max(...weights) || 1;
  weights.forEach((w, i) => {
    const [r, g, b] = heatColor(w / peak);
    cells.data.set([r, g, b, Math.round(255 * (0.2 + 0.45 * (w / peak)))], i * 4);
  });
  small.getContext("2d").putImageData(cells, 0, 0);

  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

// 0 -> dark blue, 0.5 -> red, 1 -> pale yellow (an "inferno"-like ramp, readable over photos).
function heatColor(x) {
  const stops = [
    [0.0, [20, 20, 90]],
    [0.35, [120, 30, 140]],
    [0.6, [220, 60, 60]],
    [0.85, [250, 160, 30]],
    [1.0, [255, 250, 180]],
  ];
  for (let i = 1; i < stops.length; i++) {
    const [x1, c1] = stops[i];
    const [x0, c0] = stops[i - 1];
    if (x <= x1) {
      const f = (x - x0) / (x1 - x0);
      return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
    }
  }
  return stops[stops.length - 1][1];
}

// ---------------------------------------------------------------------------------------------------------
// Wiring.

function setUp() {
  const input = $("#file-input");
  input.addEventListener("change", () => caption(input.files[0]));

  const zone = $("#drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    caption(event.dataTransfer.files[0]);
  });
  // A file dropped next to the zone must not make the browser navigate away to it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  $("#prev").addEventListener("click", () => showWord(page.word - 1));
  $("#next").addEventListener("click", () => showWord(page.word + 1));
  document.addEventListener("keydown", (event) => {
    if (!page.result || event.target.matches("input, select")) return;
    if (event.key === "ArrowLeft") showWord(page.word - 1);
    if (event.key === "ArrowRight") showWord(page.word + 1);
  });
  $("#show-heatmap").addEventListener("change", () => showWord(page.word));
  restoreApiKey();
  $("#api-key").addEventListener("input", rememberApiKey);
  window.addEventListener("resize", () => showWord(page.word));

  fetch("/readyz")
    .then((response) => response.json())
    .then((body) => {
      $("#model-info").textContent = body.model
        ? `model ${body.model.name} · ${body.model.version} · ${body.model.encoder}`
        : "model not loaded yet";
    })
    .catch(() => {
      $("#model-info").textContent = "server not reachable";
    });
}

setUp();
