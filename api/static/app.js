// omniattr web page: plain JavaScript over the HTTP API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  collectionId: null,
  attributes: [],        // [{attribute, status}] of the current collection
  query: null,           // {imageId} or {file}
  afterId: 0,
  results: [],
  selected: new Set(),   // image ids chosen for Personalize
  baseFile: null,        // an uploaded base image for apply-to-my-image
  lastAttribute: "",
  jobs: new Map(),       // job id -> last seen job
  gridLoad: 0,           // bumped by each selectCollection: an older, slower load must not fill the grid
};

// --- HTTP -------------------------------------------------------------------------------------------
function headers() {
  const key = localStorage.getItem("omniattr-key");
  return key ? { "X-API-Key": key } : {};
}

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401) $("key-box").hidden = false;
  if (!response.ok) throw new Error((data && data.detail) || `HTTP ${response.status}`);
  return data;
}

// Media URLs carry no key: POST /api/session stores it as an HttpOnly cookie that media GETs accept.
function imageUrl(path) { return path; }

async function startSession() {
  if (localStorage.getItem("omniattr-key")) await api("POST", "/api/session").catch(() => null);
}

function showError(error) {
  $("error").textContent = error.message || String(error);
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; }

async function guarded(action) {
  clearError();
  try { await action(); } catch (error) { showError(error); }
}

// --- collections and images -------------------------------------------------------------------------
async function loadCollections(selectId) {
  const { data } = await api("GET", "/api/collections");
  const select = $("collection");
  select.replaceChildren(...data.map((c) => new Option(`${c.name} (${c.image_count})`, c.id)));
  if (!data.length) {
    $("collection-info").textContent = "No collection yet: create one, then upload images.";
    return;
  }
  const chosen = selectId ?? state.collectionId ?? data[0].id;
  select.value = String(chosen);
  await selectCollection(Number(select.value));
}

async function selectCollection(id) {
  const load = ++state.gridLoad;
  state.collectionId = id;
  state.afterId = 0;
  state.query = null;
  $("grid").replaceChildren();
  // The previous collection's results, selection and generation do not belong to this one.
  state.results = [];
  state.selected.clear();
  $("results").replaceChildren();
  $("results-panel").hidden = true;
  $("generate-panel").hidden = true;
  $("generation").replaceChildren();
  $("query-info").textContent = "Click an image below to use it as the query.";
  await refreshCollectionInfo();
  if (load !== state.gridLoad) return;  // a newer selection (e.g. after an upload) owns the grid now
  await loadImages();
  updateButtons();
}

async function refreshCollectionInfo() {
  const collection = await api("GET", `/api/collections/${state.collectionId}`);
  state.attributes = collection.attributes;
  $("attribute-list").replaceChildren(...collection.attributes.map((a) => new Option(a.attribute)));
  const indexed = collection.attributes.map((a) => `${a.attribute}${a.status === "ready" ? "" : ` (${a.status})`}`);
  $("collection-info").textContent = `${collection.image_count} images` +
    (collection.failed_count ? `, ${collection.failed_count} failed` : "") +
    (indexed.length ? `; indexed attributes: ${indexed.join(", ")}` : "; no attribute indexed yet");
  updateButtons();
}

async function loadImages() {
  const load = state.gridLoad;
  const page = await api("GET",
    `/api/collections/${state.collectionId}/images?status=ready&limit=60&after_id=${state.afterId}`);
  if (load !== state.gridLoad) return;  // the grid was cleared for a newer selection while this page loaded
  for (const image of page.data) $("grid").append(tile(image, () => pickQuery(image.id)));
  state.afterId = page.next_after_id ?? state.afterId;
  $("more-images").hidden = page.next_after_id === null;
}

function tile(image, onClick, caption) {
  const box = document.createElement("div");
  box.className = "tile";
  box.dataset.imageId = image.id;
  const name = image.source.split("/").pop();
  const img = document.createElement("img");
  img.src = imageUrl(image.thumbnail_url);
  img.alt = name;
  img.loading = "lazy";
  const label = Object.assign(document.createElement("span"), { className: "name", textContent: name, title: image.source });
  const open = Object.assign(document.createElement("button"), { type: "button", className: "open", textContent: "⤢" });
  open.setAttribute("aria-label", `open ${name} larger`);
  open.addEventListener("click", (event) => { event.stopPropagation(); showLarger(image, name); });
  box.append(img, label, open);
  if (caption) {
    const label = document.createElement("span");
    label.className = "score";
    label.textContent = caption;
    box.append(label);
  }
  box.addEventListener("click", onClick);
  return box;
}

function showLarger(image, name) {
  $("viewer-image").src = imageUrl(`/api/images/${image.id}/original`);
  $("viewer-image").alt = name;
  $("viewer-caption").textContent = `image ${image.id}: ${image.source}` +
    (image.width ? ` (${image.width}x${image.height})` : "");
  $("viewer").showModal();
}

function pickQuery(imageId) {
  state.query = { imageId };
  for (const el of document.querySelectorAll("#grid .tile")) {
    el.classList.toggle("query", Number(el.dataset.imageId) === imageId);
  }
  $("query-info").textContent = `Query: image ${imageId}.`;
  updateButtons();
}

function updateButtons() {
  const attribute = $("attribute").value.trim().toLowerCase();
  const known = state.attributes.find((a) => a.attribute === attribute);
  $("search").disabled = !(state.query && attribute);
  $("index-attribute").hidden = !(attribute && state.collectionId && !known);
  $("personalize").disabled = !(state.selected.size && $("prompt").value.trim());
  refreshBaseOptions();
}

// Apply to my image: the base is nothing (text to image), the query image, a ticked result or a file.
function refreshBaseOptions() {
  const select = $("base");
  const current = select.value;
  const options = [new Option("noise (text to image)", "")];
  const queryId = state.query && state.query.imageId;
  if (queryId) options.push(new Option(`query image ${queryId}`, `image:${queryId}`));
  for (const id of state.selected) if (id !== queryId) options.push(new Option(`result image ${id}`, `image:${id}`));
  if (state.baseFile) options.push(new Option(`uploaded ${state.baseFile.name}`, "upload"));
  select.replaceChildren(...options);
  select.value = options.some((option) => option.value === current) ? current : "";
  $("strength").disabled = !select.value;
  $("keep-detail").disabled = !select.value;
}

// --- search -----------------------------------------------------------------------------------------
async function search() {
  const attribute = $("attribute").value.trim();
  let results;
  if (state.query.file) {
    const form = new FormData();
    form.append("image", state.query.file);
    form.append("collection_id", state.collectionId);
    form.append("attribute", attribute);
    form.append("limit", "24");
    results = await api("POST", "/api/search/upload", form);
  } else {
    results = await api("POST", "/api/search", {
      collection_id: state.collectionId, limit: 24,
      terms: [{ image_id: state.query.imageId, attribute }],
    });
  }
  state.results = results.results;
  state.lastAttribute = attribute;
  state.selected.clear();
  renderResults(results.took_ms);
}

function renderResults(tookMs) {
  $("results-panel").hidden = false;
  $("generate-panel").hidden = !state.generatorAvailable;
  $("results-info").textContent =
    `${state.results.length} images ranked by ${state.lastAttribute} in ${tookMs} ms. Tick results to personalize.`;
  $("results").replaceChildren(...state.results.map((hit) => {
    const parts = Object.entries(hit.attribute_scores);
    const caption = parts.length === 1
      ? `${parts[0][0]} ${hit.score.toFixed(3)}`
      : `${hit.score.toFixed(3)} · ${parts.map(([k, v]) => `${k} ${v.toFixed(3)}`).join(", ")}`;
    const box = tile(hit.image, () => toggleSelected(hit.image.id, box), caption);
    const check = document.createElement("input");
    check.type = "checkbox";
    check.setAttribute("aria-label", `select image ${hit.image.id}`);
    check.addEventListener("click", (event) => { event.stopPropagation(); toggleSelected(hit.image.id, box); });
    box.prepend(check);
    return box;
  }));
  updateButtons();
}

function toggleSelected(imageId, box) {
  if (state.selected.has(imageId)) state.selected.delete(imageId); else state.selected.add(imageId);
  box.classList.toggle("selected", state.selected.has(imageId));
  box.querySelector("input[type=checkbox]").checked = state.selected.has(imageId);
  updateButtons();
}

// --- personalize ------------------------------------------------------------------------------------
async function personalize() {
  const refs = [...state.selected].map((imageId) => ({ image_id: imageId, attribute: state.lastAttribute }));
  const body = { refs, prompt: $("prompt").value.trim() };
  const base = $("base").value;
  if (base) {
    body.strength = Number($("strength").value);
    if (!$("keep-detail").checked) body.keep_detail = 0;  // checked: the server's default sigma
  }
  let generation;
  if (base === "upload") {
    const form = new FormData();
    form.append("base", state.baseFile);
    form.append("request", JSON.stringify(body));
    generation = await api("POST", "/api/generations/upload", form);
  } else {
    if (base) body.base_image_id = Number(base.split(":")[1]);
    generation = await api("POST", "/api/generations", body);
  }
  $("personalize").disabled = true;
  const view = $("generation");
  view.replaceChildren(Object.assign(document.createElement("p"), { textContent: "Generating..." }));
  trackJob(generation.job_id);
  let current = generation;
  while (current.status === "pending" || current.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, 300));
    current = await api("GET", `/api/generations/${generation.id}`);
  }
  if (current.status !== "done") {
    const reason = current.error || `it ended ${current.status}`;
    view.replaceChildren(Object.assign(document.createElement("p"),
      { className: "failed", textContent: `Generation failed: ${reason}` }));
    updateButtons();
    throw new Error(`generation failed: ${reason}`);
  }
  const img = Object.assign(document.createElement("img"), { src: imageUrl(current.output_url), alt: "generated image" });
  const scores = document.createElement("ul");
  scores.id = "transfer-scores";
  for (const [attribute, score] of Object.entries(current.transfer_scores)) {
    scores.append(Object.assign(document.createElement("li"), { textContent: `${attribute}: ${score.toFixed(3)}` }));
  }
  const caption = Object.assign(document.createElement("div"), { innerHTML: "<strong>Attribute-transfer scores</strong>" });
  caption.append(scores);
  const request = current.request;
  const from = request.base_image_id ? `image ${request.base_image_id}` : request.base_upload ? "the uploaded image" : null;
  caption.append(Object.assign(document.createElement("p"), {
    id: "generation-base", className: "muted",
    textContent: from
      ? `Applied to ${from} at strength ${request.strength}` +
        (request.keep_detail ? `, its detail kept (${request.keep_detail} px).` : ", the generator's output as is.")
      : "Made from noise (text to image).",
  }));
  view.replaceChildren(img, caption);
  updateButtons();
}

// --- jobs -------------------------------------------------------------------------------------------
function trackJob(jobId) {
  if (jobId == null || state.jobs.has(jobId)) return;
  state.jobs.set(jobId, null);
  pollJobs();
}

async function pollJobs() {
  let active = false;
  for (const jobId of state.jobs.keys()) {
    const job = await api("GET", `/api/jobs/${jobId}`);
    state.jobs.set(jobId, job);
    active ||= job.status === "pending" || job.status === "running";
  }
  $("jobs").replaceChildren(...[...state.jobs.values()].map((job) => {
    const item = document.createElement("li");
    item.dataset.jobId = job.id;
    item.dataset.status = job.status;
    const eta = job.eta_seconds ? `, ${Math.ceil(job.eta_seconds)} s left` : "";
    item.textContent = `job ${job.id} ${job.kind}: ${job.status} ${job.done}/${job.total}` +
      (job.failed ? ` (${job.failed} failed)` : "") + eta + " ";
    // A failed or cancelled job's bar shows what succeeded, not a full bar.
    const finishedBadly = job.status === "failed" || job.status === "cancelled";
    const bar = Object.assign(document.createElement("progress"),
      { max: job.total || 1, value: finishedBadly ? job.done : job.done + job.failed });
    if (finishedBadly) bar.className = "failed";
    item.append(bar);
    return item;
  }));
  if (active) setTimeout(pollJobs, 500);
  else if (state.collectionId) await refreshCollectionInfo();
}

// --- wiring -----------------------------------------------------------------------------------------
async function init() {
  $("api-key").value = localStorage.getItem("omniattr-key") || "";
  $("api-key").addEventListener("change", () => guarded(async () => {
    localStorage.setItem("omniattr-key", $("api-key").value.trim());
    await startSession();
    await loadCollections();
  }));
  $("collection").addEventListener("change", () => guarded(() => selectCollection(Number($("collection").value))));
  $("create-collection").addEventListener("click", () => guarded(async () => {
    const created = await api("POST", "/api/collections", { name: $("new-collection").value.trim() });
    $("new-collection").value = "";
    await loadCollections(created.id);
  }));
  $("upload").addEventListener("change", () => guarded(async () => {
    const form = new FormData();
    for (const file of $("upload").files) form.append("files", file);
    const report = await api("POST", `/api/collections/${state.collectionId}/images`, form);
    const failed = report.results.filter((r) => r.status === "failed");
    if (failed.length) showError(new Error(failed.map((r) => `${r.source}: ${r.error}`).join("; ")));
    trackJob(report.index_job_id);
    await loadCollections(state.collectionId);  // new counts and the new images
  }));
  $("query-upload").addEventListener("change", () => {
    state.query = { file: $("query-upload").files[0] };
    $("query-info").textContent = `Query: uploaded ${state.query.file.name}.`;
    for (const el of document.querySelectorAll("#grid .tile.query")) el.classList.remove("query");
    updateButtons();
  });
  $("attribute").addEventListener("input", updateButtons);
  $("prompt").addEventListener("input", updateButtons);
  $("base").addEventListener("change", updateButtons);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); });
  $("base-upload").addEventListener("change", () => {
    state.baseFile = $("base-upload").files[0] || null;
    refreshBaseOptions();
    if (state.baseFile) $("base").value = "upload";
    updateButtons();
  });
  $("search").addEventListener("click", () => guarded(async () => {
    try {
      await search();
    } catch (error) {
      // The API's advice names its own route; on the page, the button is the way.
      if (/is not indexed/.test(error.message)) {
        throw new Error(`"${$("attribute").value.trim()}" is not indexed for this collection yet: ` +
          "press Index this attribute, then search again.");
      }
      throw error;
    }
  }));
  $("index-attribute").addEventListener("click", () => guarded(async () => {
    const response = await api("POST", `/api/collections/${state.collectionId}/attributes`,
      { attributes: [$("attribute").value.trim()] });
    if (response.job) trackJob(response.job.id);
  }));
  $("more-images").addEventListener("click", () => guarded(loadImages));
  $("personalize").addEventListener("click", () => guarded(personalize));
  // 503 while the workers cannot run jobs: say why, and keep the page usable for browsing and search.
  const health = await fetch("/api/health").then((response) => response.json()).catch(() => ({}));
  if (health.worker && health.worker !== "ok") showError(new Error(health.worker));
  state.generatorAvailable = Boolean(health.generator);
  await startSession();
  await guarded(loadCollections);
}

init().catch(showError);
