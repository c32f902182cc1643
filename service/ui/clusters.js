// The Clusters tab (nCLIP / xCLIP bundles): the top clusters of a typed text or an uploaded image with their
// probabilities and the distribution's entropy (POST /v1/clusters), and a cluster described by the items of a
// collection most probably in it (GET /v1/clusters/{k}), browsed one cluster after another.

import { api, checkUpload, path, Refusal } from "./api.js";
import {
  bar, byId, clearError, formatNumber, guarded, h, imageInput, numberOf, preview, readAsDataUrl,
} from "./dom.js";
import { renderItems } from "./items.js";

const $ = {
  unavailable: byId("clusters-unavailable"), tools: byId("clusters-tools"), form: byId("clusters-form"),
  text: byId("clusters-text"), topK: byId("clusters-top-k"), image: byId("clusters-image"),
  drop: byId("clusters-drop"), preview: byId("clusters-preview"), status: byId("clusters-status"),
  table: byId("clusters-results"), browse: byId("cluster-browse"), number: byId("cluster-number"),
  collection: byId("cluster-collection"), top: byId("cluster-top"), prev: byId("cluster-prev"),
  next: byId("cluster-next"), browseStatus: byId("cluster-status"), error: byId("clusters-error"),
  items: byId("cluster-items"),
};
let numClusters = 0;

export function initClusters() {
  $.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $.text.value.trim();
    guarded($.error, () => {
      if (!text) throw new Refusal("type a text, or drop an image");
      return showDistribution({ texts: [text] }, `“${text}”`);
    });
  });
  imageInput($.image, $.drop, (file) => {
    preview($.preview, file);
    guarded($.error, async () => {
      await checkUpload(file, { asJson: true });
      await showDistribution({ images: [await readAsDataUrl(file)] }, file.name);
    });
  });
  $.browse.addEventListener("submit", (event) => {
    event.preventDefault();
    browse(numberOf($.number, 0));
  });
  $.prev.addEventListener("click", () => browse(numberOf($.number, 0) - 1));
  $.next.addEventListener("click", () => browse(numberOf($.number, 0) + 1));
}

/** Whether the active model has clusters (a `clip` bundle has none: say why), and the collections to browse. */
export async function refreshClusters() {
  await guarded($.error, async () => {
    const [models, { collections }] = await Promise.all([api("/v1/models"), api("/v1/collections")]);
    const active = models.data.find((m) => m.id === models.active);
    numClusters = active ? active.num_clusters : 0;
    explainUnavailable(active);
    $.number.max = String(Math.max(numClusters - 1, 0));
    // keep the person's choice; else an image collection, whose items show as pictures
    const chosen = $.collection.value || collections.find((c) => c.modality === "image")?.name;
    $.collection.replaceChildren(...collections.map((c) => h("option", { value: c.name },
      `${c.name} (${c.modality})`)));
    if (collections.some((c) => c.name === chosen)) $.collection.value = chosen;
  });
}

function explainUnavailable(active) {
  const reason = !active ? "No model is active: activate one in the Models tab."
    : numClusters ? "" : `The active model, ${active.id}, was trained with the CLIP objective: it has no cluster `
      + "head, so it gives no cluster distributions. Activate an nCLIP or xCLIP model in the Models tab "
      + "(admin key) to use this tab.";
  $.unavailable.textContent = reason;
  $.unavailable.hidden = !reason;
  $.tools.disabled = Boolean(reason);
  if (reason) {
    $.table.hidden = true;
    $.items.replaceChildren();
  }
}

async function showDistribution(input, what) {
  $.status.textContent = `Clusters of ${what}…`;
  const answer = await api("/v1/clusters", { method: "POST", json: { ...input, top_k: numberOf($.topK, 5) } });
  const { clusters, entropy } = answer.results[0];
  $.status.textContent = `${what}: entropy ${formatNumber(entropy)} nats (uniform over ${answer.num_clusters} `
    + `clusters: ${formatNumber(Math.log(answer.num_clusters))}), model ${answer.model}.`;
  $.table.tBodies[0].replaceChildren(...clusters.map(clusterRow));
  $.table.hidden = false;
}

function clusterRow({ cluster, probability }) {
  const show = h("button", { type: "button" }, `Items of cluster ${cluster}`);
  show.addEventListener("click", () => browse(cluster));
  return h("tr", {}, h("th", { scope: "row" }, String(cluster)),
    h("td", {}, bar(probability, 0, 1, `probability of cluster ${cluster}`)), h("td", {}, show));
}

/** Show cluster `k` (clamped to the model's clusters) by its most probable items of the chosen collection. */
async function browse(k) {
  const cluster = Math.min(Math.max(k, 0), Math.max(numClusters - 1, 0));
  $.number.value = String(cluster);
  const collection = $.collection.value;
  await guarded($.error, async () => {
    if (!collection) throw new Refusal("no collection to describe the cluster with: create one first");
    $.browseStatus.textContent = `Cluster ${cluster}…`;
    const params = new URLSearchParams({ collection, top: numberOf($.top, 12) });
    const url = `${path("v1", "clusters", cluster)}?${params}`;
    const answer = await api(url);
    $.browseStatus.textContent = `Cluster ${cluster} (of 0–${numClusters - 1}): the ${answer.items.length} items of `
      + `${collection} most probably in it, model ${answer.model}.`;
    clearError($.error);
    await renderItems($.items, collection, answer.items, { scoreName: "probability" });
  });
}
