// The Models & collections tab: registered models (objective, dims, which is active) with activate and roll back,
// and each collection's stats with its re-embedding progress, polled while the tab is open.

import { api, path } from "./api.js";
import { byId, clearError, guarded, h, showError } from "./dom.js";

const $ = {
  refresh: byId("models-refresh"), rollback: byId("models-rollback"), status: byId("models-status"),
  error: byId("models-error"), models: byId("models-table"), collections: byId("collections-table"),
};
const POLL_MS = { reembedding: 1000, idle: 5000 };
let pollTimer = null;
let visible = false;

export function initModels() {
  $.refresh.addEventListener("click", () => refreshModels());
  $.rollback.addEventListener("click", () => act("Rolling back", "/v1/models/rollback"));
}

/** Start or stop the live view as the tab is shown or hidden. */
export function setModelsVisible(shown) {
  visible = shown;
  clearTimeout(pollTimer);
  if (shown) refreshModels();
}

/** Show the models and collections; `keepMessage`: leave an action's message in place (polls, after acting). */
export async function refreshModels({ keepMessage = false } = {}) {
  clearTimeout(pollTimer);
  if (!keepMessage) clearError($.error);
  let models;
  let collections;
  try {
    [models, { collections }] = await Promise.all([api("/v1/models"), api("/v1/collections")]);
  } catch (error) {
    showError($.error, error); // and stop polling: a refresh (button, key, tab) starts again
    return;
  }
  renderModels(models);
  renderCollections(collections, models.active);
  if (visible) {
    const running = collections.some((c) => c.reembed?.running);
    pollTimer = setTimeout(() => refreshModels({ keepMessage: true }), running ? POLL_MS.reembedding : POLL_MS.idle);
  }
}

/** POST `url` (activate, roll back, re-embed), then show the new state. */
async function act(doing, url) {
  $.status.textContent = `${doing}…`;
  const answer = await guarded($.error, () => api(url, { method: "POST" }));
  $.status.textContent = answer ? `${doing}: done.` : "";
  await refreshModels({ keepMessage: true });
}

function renderModels({ active, data }) {
  $.models.tBodies[0].replaceChildren(...data.map((model) => {
    const isActive = model.id === active;
    const action = isActive ? "" : button(`Activate ${model.id}`, "Activate",
      () => act(`Activating ${model.id}`, `${path("v1", "models", model.id)}/activate`));
    const dims = `${model.embed_dim}-d embedding` + (model.num_clusters ? `, ${model.num_clusters} clusters` : "");
    return h("tr", { "data-model": model.id, class: isActive ? "active" : "" },
      h("th", { scope: "row" }, h("span", { class: "id" }, model.id), h("br"), h("small", {}, model.path ?? "")),
      h("td", {}, model.objective), h("td", {}, dims),
      h("td", {}, `${model.image_size}px images, ${model.context_length} tokens`),
      h("td", { class: "state" }, isActive ? "active" : "registered"), h("td", {}, action));
  }));
}

function renderCollections(collections, activeId) {
  $.collections.tBodies[0].replaceChildren(...collections.map((c) => h("tr", { "data-collection": c.name },
    h("th", { scope: "row" }, `${c.name} (${c.modality})`), h("td", {}, String(c.count)),
    h("td", {}, c.index_factory), h("td", { class: "model" }, c.model_id),
    h("td", { class: "reembed" }, progressOf(c.reembed)), h("td", {}, reembedButton(c, activeId)))));
}

/** Re-embedding is offered where it would do something: a collection outside the active model's space. */
function reembedButton(collection, activeId) {
  if (collection.model_id === activeId || collection.reembed?.running) return "";
  return button(`Re-embed ${collection.name}`, "Re-embed",
    () => act(`Re-embedding ${collection.name}`, `${path("v1", "collections", collection.name)}/reembed`));
}

function progressOf(reembed) {
  if (!reembed) return "–";
  const { done, total, running, target_model_id: target } = reembed;
  const label = `${done} of ${total} toward ${target ?? "its model"}${running ? "" : " (stopped)"}`;
  return h("span", { class: "bar" },
    h("progress", { max: String(Math.max(total, 1)), value: String(done), "aria-label": `re-embedding: ${label}` }),
    h("span", { class: "value" }, label));
}

function button(label, text, onClick) {
  const element = h("button", { type: "button", "aria-label": label }, text);
  element.addEventListener("click", onClick);
  return element;
}
