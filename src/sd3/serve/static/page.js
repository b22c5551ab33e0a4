// sd3's page: the native API (/v1/...) from plain JavaScript, no build step, nothing remote.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "sd3-api-key";
const PAGE = 24;
const KEEP_CARDS = 8;

const state = {
  info: null,
  key: localStorage.getItem(KEY_STORE) || "",
  initImage: null, // data: URL of the img2img image
  masked: false, // whether the mask brush has painted on it
  controlImage: null, // data: URL of the ControlNet's image
  carried: {}, // settings from an image that the form does not show (slg, t5)
  historyOffset: 0,
  query: "",
  detail: null,
};

// --- talking to the server -----------------------------------------------------------------

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(describe(detail) || "HTTP " + status);
    this.status = status;
  }
}

function describe(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const field = (d.loc || []).filter((p) => p !== "body").join(".");
      return (field ? field + ": " : "") + d.msg;
    }).join("; ");
  }
  return JSON.stringify(detail);
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: headers(options.body ? { "Content-Type": "application/json" } : {}),
  });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new ApiError(401, "this server needs its API key");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, body && body.detail);
  return body;
}

// Image URLs: plain when no key is needed, else fetched with the key into blob: URLs.
async function imageSource(url) {
  if (!state.key) return url;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, "cannot load " + url);
  return URL.createObjectURL(await response.blob());
}

// Server-sent events over fetch (EventSource cannot send the key).
async function events(path, onEvent) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, "cannot follow " + path);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// --- the form ------------------------------------------------------------------------------

const FIELDS = {
  prompt: "prompt", negative_prompt: "negative", width: "width", height: "height",
  steps: "steps", cfg: "cfg", sampler: "sampler", seed: "seed", shift: "shift",
  cfg_start: "cfg-start", cfg_end: "cfg-end", denoise: "denoise",
};
const NUMBERS = new Set(["width", "height", "steps", "cfg", "seed", "shift", "cfg_start", "cfg_end", "denoise"]);
const INTEGERS = new Set(["width", "height", "steps", "seed"]);

function fillForm(settings) {
  for (const [name, id] of Object.entries(FIELDS)) {
    if (settings[name] !== undefined && settings[name] !== null) $(id).value = settings[name];
  }
  state.carried = {};
  for (const name of ["slg", "t5_length", "use_t5"]) {
    if (name in settings) state.carried[name] = settings[name];
  }
  showCarried();
}

function showCarried() {
  const names = Object.keys(state.carried);
  $("carried").hidden = names.length === 0;
  $("carried").textContent = names.length
    ? "Also from the image: " + names.map((n) => n + " " + JSON.stringify(state.carried[n])).join(", ")
    : "";
}

function readForm() {
  const request = {};
  for (const [name, id] of Object.entries(FIELDS)) {
    const raw = $(id).value.trim();
    if (name === "denoise" && !state.initImage) continue;
    if (raw === "" && name !== "prompt" && name !== "negative_prompt") continue;
    request[name] = NUMBERS.has(name) ? (INTEGERS.has(name) ? parseInt(raw, 10) : parseFloat(raw)) : raw;
  }
  request.num_images = parseInt($("batch").value, 10) || 1;
  if (state.initImage) request.init_image = state.initImage;
  if (state.initImage && state.masked) {
    request.mask = maskDataURL();
    request.inpaint = { mask_blur: parseFloat($("mask-blur").value) || 0 };
  }
  const lora = $("lora").value;
  if (lora) request.loras = { [lora]: parseFloat($("lora-scale").value) || 0 };
  const controlnet = $("controlnet").value;
  if (controlnet && state.controlImage) {
    request.controls = [{
      name: controlnet,
      image: state.controlImage,
      strength: parseFloat($("control-strength").value) || 0,
      preprocess: $("control-preprocess").value,
    }];
  }
  return { ...request, ...state.carried };
}

function message(text, kind = "error") {
  $("message").textContent = text;
  $("message").className = text ? kind : "";
}

async function generate() {
  message("");
  let job;
  try {
    job = await api("/v1/jobs", { method: "POST", body: JSON.stringify(readForm()) });
  } catch (e) {
    message(e.message);
    return;
  }
  follow(job);
}

// --- jobs: progress, previews, results ---------------------------------------------------

function follow(job) {
  const card = document.createElement("div");
  card.className = "job-card";
  card.dataset.job = job.id;
  card.innerHTML = `
    <div class="row"><span class="job-state"></span><button type="button" class="cancel">Cancel</button></div>
    <progress max="1" value="0"></progress>
    <div class="job-images"><img class="preview" alt="preview" hidden></div>
    <p class="job-prompt muted"></p>`;
  card.querySelector(".job-prompt").textContent = job.settings.prompt;
  card.querySelector(".cancel").addEventListener("click", async () => {
    try {
      await api("/v1/jobs/" + job.id, { method: "DELETE" });
    } catch (e) {
      message(e.message);
    }
  });
  $("jobs").prepend(card);
  while ($("jobs").children.length > KEEP_CARDS) $("jobs").lastElementChild.remove();
  const show = (view) => {
    const where = view.queue_position ? ` (queue position ${view.queue_position})` : "";
    const steps = view.steps ? ` step ${view.step}/${view.steps}` : "";
    const eta = view.eta ? `, ${view.eta.toFixed(1)} s left` : "";
    card.querySelector(".job-state").textContent = view.state + where + steps + eta;
    card.querySelector("progress").value = view.steps ? view.step / view.steps : 0;
    card.dataset.state = view.state;
  };
  show(job);
  events("/v1/jobs/" + job.id + "/events", async (name, data) => {
    show(data);
    if (data.preview) {
      const img = card.querySelector(".preview");
      img.src = data.preview;
      img.hidden = false;
    }
    if (name === "done") {
      card.querySelector(".cancel").hidden = true;
      const box = card.querySelector(".job-images");
      box.innerHTML = "";
      for (const image of data.images) {
        const img = document.createElement("img");
        img.className = "result";
        img.alt = "seed " + image.seed;
        img.src = await imageSource(image.url);
        box.append(img);
      }
      loadHistory(true);
    } else if (name === "failed" || name === "cancelled") {
      card.querySelector(".cancel").hidden = true;
      card.querySelector(".job-state").textContent = name + (data.error ? ": " + data.error : "");
    }
  }).catch((e) => message(e.message));
}

// --- history -------------------------------------------------------------------------------

async function loadHistory(reset) {
  if (reset) state.historyOffset = 0;
  const q = encodeURIComponent(state.query);
  let page;
  try {
    page = await api(`/v1/history?limit=${PAGE}&offset=${state.historyOffset}&q=${q}`);
  } catch (e) {
    if (e.status !== 401) message(e.message);
    return;
  }
  const gallery = $("gallery");
  if (reset) gallery.innerHTML = "";
  for (const item of page.items) gallery.append(galleryItem(item));
  state.historyOffset += page.items.length;
  $("more").hidden = state.historyOffset >= page.total;
  $("history-count").textContent = page.total + (page.total === 1 ? " image" : " images");
}

function galleryItem(item) {
  const figure = document.createElement("figure");
  figure.className = "item";
  figure.dataset.name = item.name;
  const img = document.createElement("img");
  img.alt = item.prompt;
  img.loading = "lazy";
  imageSource(item.url).then((src) => { img.src = src; }).catch((e) => message(e.message));
  const caption = document.createElement("figcaption");
  caption.textContent = item.prompt || "(no prompt)";
  figure.append(img, caption);
  figure.tabIndex = 0;
  figure.addEventListener("click", () => showDetail(item, img));
  figure.addEventListener("keydown", (e) => { if (e.key === "Enter") showDetail(item, img); });
  return figure;
}

function showDetail(item, img) {
  state.detail = item;
  $("detail-image").src = img.src;
  $("detail-download").href = img.src;
  $("detail-download").download = item.name;
  const table = $("detail-settings");
  table.innerHTML = "";
  const rows = { ...item.settings, model: item.model, file: item.name };
  for (const [key, value] of Object.entries(rows)) {
    if (key === "num_images") continue;
    const tr = table.insertRow();
    tr.insertCell().textContent = key;
    tr.insertCell().textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  $("detail").showModal();
}

// --- images in: img2img and settings from a PNG -------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function setInitImage(file) {
  state.initImage = file ? await readAsDataURL(file) : null;
  $("init-preview").hidden = !state.initImage;
  $("init-thumb").src = state.initImage || "";
  if (!file) $("init-image").value = "";
  $("mask-editor").hidden = !state.initImage;
  if (state.initImage) {
    const base = $("mask-base");
    base.src = state.initImage;
    await base.decode();
    const canvas = $("mask-canvas");
    canvas.width = base.naturalWidth;
    canvas.height = base.naturalHeight;
  }
  clearMask();
}

// --- the mask brush: white strokes on a transparent canvas over the init image ---------------

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.masked = false;
}

function maskDataURL() {
  // the strokes white on black, at the init image's size: what the server reads as the mask
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

function setUpBrush() {
  const canvas = $("mask-canvas");
  let last = null;
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * (canvas.width / box.width), (e.clientY - box.top) * (canvas.height / box.height)];
  };
  const paint = (e) => {
    const point = at(e);
    const ctx = canvas.getContext("2d");
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = parseFloat($("brush").value) * scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...(last || point));
    ctx.lineTo(...point);
    ctx.stroke();
    last = point;
    state.masked = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = null;
    paint(e);
  });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons & 1) paint(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("clear-mask").addEventListener("click", clearMask);
}

async function loadSettingsFrom(file) {
  message("");
  try {
    const found = await api("/v1/png-info", {
      method: "POST",
      body: JSON.stringify({ image: await readAsDataURL(file) }),
    });
    fillForm(found.settings);
    const left = found.left_out.length ? " (not used: " + found.left_out.join(", ") + ")" : "";
    message(`Settings loaded from ${file.name} (${found.source})${left}`, "info");
  } catch (e) {
    message(e.message);
  }
}

// --- start ---------------------------------------------------------------------------------

async function start() {
  try {
    state.info = await api("/v1/info");
  } catch (e) {
    $("status").textContent = e.message;
    return;
  }
  $("key-form").hidden = true;
  const info = state.info;
  $("model").textContent = info.model.title;
  $("status").textContent = "ready";
  const select = $("sampler");
  select.innerHTML = "";
  for (const s of info.samplers) select.add(new Option(`${s.a1111} (${s.name})`, s.name));
  fillForm({ ...info.defaults, seed: -1, denoise: info.defaults.denoise < 1 ? info.defaults.denoise : 0.6 });
  state.carried = {};
  showCarried();
  $("batch").max = info.limits.max_batch;
  $("steps").max = info.limits.max_steps;
  $("width").max = Math.min(info.limits.max_width, info.max_size);
  $("height").max = Math.min(info.limits.max_height, info.max_size);
  $("img2img").hidden = !info.features.img2img;
  const loras = $("lora");
  for (const name of info.features.loras || []) loras.add(new Option(name, name));
  $("lora-row").hidden = !(info.features.loras || []).length;
  const nets = $("controlnet");
  for (const name of info.features.controlnets || []) nets.add(new Option(name, name));
  $("controlnet-row").hidden = !(info.features.controlnets || []).length;
  loadHistory(true);
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      generate();
    }
  });
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 32);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORE, state.key);
    start();
  });
  $("init-image").addEventListener("change", (e) => setInitImage(e.target.files[0]).catch((x) => message(x.message)));
  $("clear-init").addEventListener("click", () => setInitImage(null));
  setUpBrush();
  $("control-image").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    state.controlImage = file ? await readAsDataURL(file) : null;
  });
  $("load-png").addEventListener("change", (e) => {
    if (e.target.files[0]) loadSettingsFrom(e.target.files[0]);
    e.target.value = "";
  });
  let searchTimer;
  $("search").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.query = e.target.value; loadHistory(true); }, 250);
  });
  $("more").addEventListener("click", () => loadHistory(false));
  $("use-settings").addEventListener("click", () => {
    fillForm(state.detail.settings);
    $("batch").value = 1;
    $("detail").close();
    message("Settings of " + state.detail.name + " loaded", "info");
  });
  $("detail-close").addEventListener("click", () => $("detail").close());

  // drop a PNG anywhere: its settings; onto the image-to-image box: the init image
  let depth = 0;
  const overlay = $("drop-overlay");
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; overlay.hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (!file) return;
    if (e.target.closest && e.target.closest("#img2img")) setInitImage(file).catch((x) => message(x.message));
    else loadSettingsFrom(file);
  });
  start();
});
