// The Search tab: a collection searched by text, by an uploaded or dropped image, or by one of its items ("more
// like this"), with metadata filters as chips; text and item queries live in the address bar, so that reloading
// or sharing the link repeats them.

import { api, checkUpload, path, Refusal } from "./api.js";
import {
  byId, clearError, downloadJson, guarded, h, imageInput, numberOf, preview, readAsDataUrl, showError,
} from "./dom.js";
import { renderItems } from "./items.js";

const $ = {
  form: byId("search-form"), collection: byId("search-collection"), text: byId("search-text"),
  k: byId("search-k"), image: byId("search-image"), drop: byId("search-drop"), preview: byId("search-preview"),
  filterForm: byId("filter-form"), filterInput: byId("filter-input"), chips: byId("filter-chips"),
  status: byId("search-status"), download: byId("search-download"), error: byId("search-error"),
  results: byId("search-results"),
};
let filters = []; // [{key, value, text}]: value as the API compares it, text as the person typed it
let lastResult = null;
let searchCount = 0; // a search answered after a newer one started is dropped
let collectionsLoaded = Promise.resolve(); // a query typed while the list loads waits for it

export function initSearch() {
  $.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await collectionsLoaded;
    const text = $.text.value.trim();
    if (text) search({ ...currentQuery(), text }, { push: true });
    else showError($.error, new Refusal("type a text query, drop an image, or click a result for more like it"));
  });
  imageInput($.image, $.drop, searchByImage);
  $.filterForm.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded($.error, () => addFilter($.filterInput.value));
  });
  $.download.addEventListener("click", () => {
    if (lastResult) downloadJson(lastResult, `search-${lastResult.collection}.json`);
  });
}

/** Fill the collection list, then repeat the query the address holds (if any). */
export async function refreshSearch() {
  collectionsLoaded = guarded($.error, fillCollections);
  if (await collectionsLoaded) await restoreFromUrl();
}

async function fillCollections() {
  const { collections } = await api("/v1/collections");
  const wanted = new URLSearchParams(location.search).get("collection") || $.collection.value;
  $.collection.replaceChildren(...collections.map((c) => h("option", { value: c.name },
    `${c.name} (${c.modality}, ${c.count} items)`)));
  if (collections.some((c) => c.name === wanted)) $.collection.value = wanted;
  if (!collections.length) {
    $.status.textContent = "No collections yet: create one through the API (PUT /v1/collections/{name}).";
  }
  return true;
}

function currentQuery() {
  return { collection: $.collection.value, k: numberOf($.k, 12), filters: [...filters] };
}

async function searchByImage(file) {
  preview($.preview, file);
  await collectionsLoaded;
  try {
    await checkUpload(file, { asJson: true });
  } catch (error) {
    showError($.error, error);
    return;
  }
  const image = await readAsDataUrl(file);
  await search({ ...currentQuery(), image, imageName: file.name }, { push: true });
}

async function searchLike(id) {
  await search({ ...currentQuery(), id }, { push: true });
  $.results.querySelector("button")?.focus(); // the clicked tile is gone: keep the keyboard in the results
}

/** Run `query` ({collection, k, filters, and one of text, id, image}) and show its results. */
async function search(query, { push }) {
  if (!query.collection) {
    showError($.error, new Refusal("choose a collection first (none is listed: is your key saved?)"));
    return;
  }
  const count = ++searchCount;
  clearError($.error);
  $.status.textContent = `Searching ${query.collection}…`;
  let result;
  try {
    const url = path("v1", "collections", query.collection, "search");
    result = await api(url, { method: "POST", json: requestOf(query) });
  } catch (error) {
    if (count === searchCount) {
      $.status.textContent = "";
      showError($.error, error);
    }
    return;
  }
  if (count !== searchCount) return;
  if (push) history.pushState(null, "", urlOf(query));
  showResults(query, result);
}

function requestOf(query) {
  const body = { k: query.k };
  if (query.text !== undefined) Object.assign(body, { text: query.text, truncate: true });
  else if (query.id !== undefined) body.id = query.id;
  else body.image = query.image;
  const filter = filterObject(query.filters);
  if (filter) body.filter = filter;
  return body;
}

function showResults(query, result) {
  const what = query.text !== undefined ? `“${query.text}”` : query.id !== undefined ? `items like ${query.id}`
    : `the image ${query.imageName} (image queries are not kept in the address)`;
  $.status.textContent = `${result.results.length} results for ${what} in ${result.collection}, model ${result.model}.`;
  const asked = query.text ?? (query.id !== undefined ? { id: query.id } : { image: query.imageName });
  lastResult = { collection: result.collection, model: result.model, query: asked, k: query.k,
    filter: filterObject(query.filters), results: result.results };
  $.download.disabled = false;
  renderItems($.results, result.collection, result.results, { scoreName: "score", onPick: searchLike });
}

// -- the address bar ----------------------------------------------------------------------------------------------
function urlOf(query) {
  const params = new URLSearchParams({ tab: "search", collection: query.collection, k: String(query.k) });
  if (query.text !== undefined) params.set("text", query.text);
  if (query.id !== undefined) params.set("id", query.id);
  for (const f of query.filters) params.append("filter", f.text);
  return `${location.pathname}?${params}`;
}

async function restoreFromUrl() {
  const params = new URLSearchParams(location.search);
  if ((params.get("tab") ?? "search") !== "search") return;
  filters = params.getAll("filter").map(parseFilter).filter(Boolean);
  renderChips();
  if (params.has("k")) $.k.value = params.get("k");
  if (params.has("collection")) $.collection.value = params.get("collection");
  const text = params.get("text");
  const id = params.get("id");
  $.text.value = text ?? "";
  if (text) await search({ ...currentQuery(), text }, { push: false });
  else if (id) await search({ ...currentQuery(), id }, { push: false });
}

// -- metadata filters ---------------------------------------------------------------------------------------------
/** `key = value`: numbers, true, false, null and "quoted" strings are read as JSON, anything else as text. */
function parseFilter(text) {
  const at = text.indexOf("=");
  if (at <= 0) return null;
  const key = text.slice(0, at).trim();
  const raw = text.slice(at + 1).trim();
  if (!key || !raw) return null;
  let value = raw;
  if (/^(-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null|".*")$/.test(raw)) value = JSON.parse(raw);
  return { key, value, text: `${key} = ${raw}` };
}

function addFilter(text) {
  const filter = parseFilter(text);
  if (!filter) throw new Refusal(`a filter reads key = value, e.g. colour = red (got “${text}”)`);
  filters.push(filter);
  $.filterInput.value = "";
  renderChips();
}

/** The API's filter: one key's several values become {"in": [...]}. */
function filterObject(list) {
  if (!list.length) return undefined;
  const byKey = {};
  for (const { key, value } of list) (byKey[key] ??= []).push(value);
  return Object.fromEntries(Object.entries(byKey).map(([k, v]) => [k, v.length === 1 ? v[0] : { in: v }]));
}

function renderChips() {
  $.chips.replaceChildren(...filters.map((filter, index) => {
    const remove = h("button", { type: "button", "aria-label": `Remove filter ${filter.text}` }, "×");
    remove.addEventListener("click", () => {
      filters.splice(index, 1);
      renderChips();
    });
    return h("li", { class: "chip" }, h("span", {}, filter.text), remove);
  }));
}
