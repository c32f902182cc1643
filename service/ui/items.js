// A grid of collection items (search results, a cluster's items): thumbnails from the item's kept image bytes
// (GET /v1/collections/{name}/items/{id}), texts for text items, id, score and metadata.

import { api, path } from "./api.js";
import { formatNumber, h } from "./dom.js";

const PARALLEL_FETCHES = 6; // what a browser opens to one origin over HTTP/1.1 anyway
// the first base64 characters of each image format's magic bytes → its media type
const SIGNATURES = [["iVBORw0KGgo", "image/png"], ["/9j/", "image/jpeg"], ["R0lGOD", "image/gif"],
  ["UklGR", "image/webp"], ["Qk", "image/bmp"]];

function mediaType(base64) {
  const found = SIGNATURES.find(([prefix]) => base64.startsWith(prefix));
  return found ? found[1] : "image/png";
}

function metadataText(metadata) {
  return Object.entries(metadata ?? {}).map(([key, value]) => `${key}: ${JSON.stringify(value)}`).join("\n");
}

/**
 * Render `hits` ({id, metadata, and score or probability}) into the list `grid`; `onPick(id)`, when given, makes
 * each tile a button ("more like this"). Thumbnails load after, a few at a time.
 */
export function renderItems(grid, collection, hits, { scoreName, onPick } = {}) {
  const tiles = hits.map((hit) => tile(hit, scoreName, onPick));
  grid.replaceChildren(...tiles.map(({ element }) => element));
  return fillPreviews(collection, tiles);
}

function tile(hit, scoreName, onPick) {
  const body = h("span", { class: "thumb" }, h("span", { class: "placeholder" }, "…"));
  const described = metadataText(hit.metadata);
  const face = onPick
    ? h("button", { type: "button", class: "pick", "aria-label": `More like ${hit.id}`, title: described }, body)
    : h("div", { class: "pick", title: described }, body);
  if (onPick) face.addEventListener("click", () => onPick(hit.id));
  const score = hit[scoreName];
  const caption = h("div", { class: "caption" },
    h("span", { class: "score", title: scoreName }, formatNumber(score)), " ",
    h("span", { class: "id" }, hit.id));
  const meta = h("dl", { class: "meta" }, ...Object.entries(hit.metadata ?? {}).flatMap(([key, value]) => [
    h("dt", {}, key), h("dd", {}, typeof value === "string" ? value : JSON.stringify(value))]));
  const element = h("li", { class: "item", "data-id": hit.id }, face, caption, meta);
  return { element, body, hit };
}

async function fillPreviews(collection, tiles) {
  const queue = [...tiles];
  const worker = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) await fillPreview(collection, next);
  };
  await Promise.all(Array.from({ length: PARALLEL_FETCHES }, worker));
}

async function fillPreview(collection, { body, hit }) {
  let item;
  try {
    item = await api(path("v1", "collections", collection, "items", hit.id));
  } catch (error) {
    body.replaceChildren(h("span", { class: "placeholder" }, `no preview: ${error.message}`));
    return;
  }
  if (item.image) {
    body.replaceChildren(h("img", { src: `data:${mediaType(item.image)};base64,${item.image}`, alt: hit.id }));
  } else if (item.text !== null && item.text !== undefined) {
    body.replaceChildren(h("span", { class: "text" }, item.text));
  } else {
    const where = item.image_path ? `image at ${item.image_path} (bytes not kept)` : `${item.kind} item`;
    body.replaceChildren(h("span", { class: "placeholder" }, where));
  }
}
