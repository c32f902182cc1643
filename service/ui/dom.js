// DOM helpers shared by the tabs: element building (text only, never HTML strings), error regions, image inputs.

import { ApiError, Refusal, explain } from "./api.js";

/** An element with attributes and children; strings become text nodes, so API data is never parsed as HTML. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return element;
}

export const byId = (id) => document.getElementById(id);

/** Show `error` (an ApiError or any other) in the alert region `region`, with what to do about it. */
export function showError(region, error) {
  const lines = error instanceof ApiError ? explain(error) : error instanceof Refusal ? [error.message]
    : [`Unexpected error in the page: ${error?.message ?? error}`];
  region.replaceChildren(...lines.map((line) => h("p", {}, line)));
  region.hidden = false;
}

export function clearError(region) {
  region.replaceChildren();
  region.hidden = true;
}

/** Run `action`, showing its failure in `region` instead of losing it to the console. */
export async function guarded(region, action) {
  clearError(region);
  try {
    return await action();
  } catch (error) {
    showError(region, error);
    return undefined;
  }
}

/** A number input's value, or `fallback` when empty. */
export function numberOf(input, fallback) {
  const value = input.valueAsNumber;
  return Number.isFinite(value) ? value : fallback;
}

export function formatNumber(value, digits = 3) {
  return Number(value).toFixed(digits);
}

/**
 * Make a file input's label a drop zone too: `onFile(file)` runs for a chosen or dropped image. The input stays
 * the keyboard's way in; dropping is the pointer's shortcut.
 */
export function imageInput(input, zone, onFile) {
  input.addEventListener("change", () => input.files[0] && onFile(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) onFile(file);
  });
}

/** Show `file` in the preview `img` (a blob: URL, released when replaced). */
export function preview(img, file) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  img.hidden = false;
}

export function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Offer `data` as a JSON file download. */
export function downloadJson(data, fileName) {
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = h("a", { href: url, download: fileName, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** A meter bar with its value as text beside it, for probabilities and cosines. */
export function bar(value, min, max, label) {
  return h("span", { class: "bar" },
    h("meter", { min: String(min), max: String(max), value: String(value), "aria-label": label }),
    h("span", { class: "value" }, formatNumber(value)));
}
