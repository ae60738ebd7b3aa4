// captioner web page: upload an image, show its captions and the attention map of each word.
// Plain browser JavaScript, no build step. Talks to POST /v1/captions with attention=true.
"use strict";

const $ = (selector) => document.querySelector(selector);

const page = {
  result: null, // the last CaptionResponse
  word: 0, // index of the word whose attention map is shown
  photoUrl: null, // object URL of the uploaded file (revoked on the next upload)
  style: null, // {colours, opacity}: the figures' colour lookup table and blend, from /attention-style.json
};

// ---------------------------------------------------------------------------------------------------------
// Upload.

// The fields start at the server's defaults (it fills them in when it serves the page): the CLI's, RECOMMENDED.
// Only what applies to the chosen method is sent; greedy decoding gives one caption. As on the command line, a
// beam size left at its default widens to the number of captions asked for; one the user set is kept.
function decodingParams() {
  const params = new FormData();
  const method = $("#method").value;
  const beam = $("#beam-size");
  params.set("method", method);
  if (method === "beam" && beam.value !== beam.defaultValue) params.set("beam_size", beam.value);
  if (method !== "greedy") params.set("num_captions", $("#num-captions").value);
  if (method === "sample") params.set("temperature", $("#temperature").value);
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
  photo.onerror = async () => {
    // A format this browser cannot display (HEIC outside Safari, TIFF): ask the server for a JPEG of it, once.
    photo.onerror = () => {
      render(body);
      setState("done", "This browser cannot display the image, so the attention maps have nothing to cover.");
    };
    const uploaded = page.photoUrl;
    const preview = await fetchPreview(file);
    if (page.photoUrl !== uploaded) return; // another photo was chosen meanwhile
    if (!preview) return photo.onerror();
    URL.revokeObjectURL(page.photoUrl);
    page.photoUrl = URL.createObjectURL(preview);
    photo.src = page.photoUrl;
  };
  photo.src = page.photoUrl;
}

// The photo as a JPEG, from POST /v1/previews (EXIF orientation applied as for the model); null on failure.
async function fetchPreview(file) {
  const form = new FormData();
  form.set("image", file, file.name);
  try {
    const response = await fetch("/v1/previews?max_side=1600", { method: "POST", body: form, headers: authHeaders() });
    return response.ok ? await response.blob() : null;
  } catch (err) {
    return null;
  }
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
  drawHeatmap(attention.alphas[page.word], attention.grid);
}

// Attention maps are drawn as captioner.inference.visualize draws its figures: the map (h x w) upsampled bilinearly onto the
// whole displayed photo (the model saw the whole photo squashed to a square, so the grid spans it whatever its
// aspect ratio), scaled by its own peak, coloured through the figures' lookup table and blended at their
// opacity. The table and the opacity come from the server (/attention-style.json), so there is one ramp.
function drawHeatmap(alphas, grid) {
  const photo = $("#photo");
  const canvas = $("#heatmap");
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.round(photo.clientWidth * scale);
  canvas.height = Math.round(photo.clientHeight * scale);
  canvas.style.width = `${photo.clientWidth}px`;
  canvas.style.height = `${photo.clientHeight}px`;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!$("#show-heatmap").checked || !page.style || canvas.width === 0 || canvas.height === 0) return;

  const heat = upsample(alphas, grid, canvas.width, canvas.height);
  let peak = 0;
  for (const v of heat) peak = Math.max(peak, v);
  const { colours, opacity } = page.style;
  const levels = colours.length;
  const pixels = ctx.createImageData(canvas.width, canvas.height);
  const alpha = Math.round(255 * opacity);
  for (let i = 0; i < heat.length; i++) {
    const x = peak > 0 ? heat[i] / peak : 0;
    const [r, g, b] = colours[Math.min(Math.floor(x * levels), levels - 1)];
    pixels.data.set([r, g, b, alpha], i * 4);
  }
  ctx.putImageData(pixels, 0, 0);
}

// alphas (h x w nested arrays) -> Float32Array of height * width, row-major: bilinear with half-pixel centres,
// the numbers of captioner.inference.visualize.upsample_attention (PyTorch's interpolate, align_corners=False).
function upsample(alphas, grid, width, height) {
  const out = new Float32Array(width * height);
  const axis = (size, cells) => {
    const scale = cells / size;
    return Array.from({ length: size }, (_, i) => {
      const src = Math.max((i + 0.5) * scale - 0.5, 0);
      const lo = Math.min(Math.floor(src), cells - 1);
      return [lo, Math.min(lo + 1, cells - 1), src - lo];
    });
  };
  const rows = axis(height, grid.height);
  const cols = axis(width, grid.width);
  for (let y = 0; y < height; y++) {
    const [r0, r1, fy] = rows[y];
    for (let x = 0; x < width; x++) {
      const [c0, c1, fx] = cols[x];
      const top = alphas[r0][c0] * (1 - fx) + alphas[r0][c1] * fx;
      const bottom = alphas[r1][c0] * (1 - fx) + alphas[r1][c1] * fx;
      out[y * width + x] = Math.max(top * (1 - fy) + bottom * fy, 0);
    }
  }
  return out;
}

async function loadAttentionStyle() {
  const response = await fetch("/attention-style.json");
  page.style = await response.json();
  const { colours } = page.style;
  const stops = [0, 0.25, 0.5, 0.75, 1].map((x) => {
    const [r, g, b] = colours[Math.min(Math.floor(x * colours.length), colours.length - 1)];
    return `rgb(${r}, ${g}, ${b}) ${x * 100}%`;
  });
  $(".ramp").style.background = `linear-gradient(90deg, ${stops.join(", ")})`;
  if (page.result) showWord(page.word);
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

  loadAttentionStyle().catch(() => {
    $("#model-info").textContent = "attention colours not available";
  });
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
