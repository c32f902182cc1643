// The Tag tab: zero-shot tags of an uploaded or dropped image (POST /v1/classify, multipart) against a label set
// (the bundle's or one created through the API) or typed labels, with optional prompt templates; each label's
// probability and cosine as bars, top k or every label above a threshold.

import { api, checkUpload, Refusal } from "./api.js";
import { bar, byId, clearError, guarded, h, imageInput, numberOf, preview } from "./dom.js";

const $ = {
  form: byId("tag-form"), image: byId("tag-image"), drop: byId("tag-drop"), preview: byId("tag-preview"),
  labelSet: byId("tag-label-set"), labels: byId("tag-labels"), templates: byId("tag-templates"),
  topK: byId("tag-top-k"), multi: byId("tag-multi"), threshold: byId("tag-threshold"),
  status: byId("tag-status"), error: byId("tag-error"), table: byId("tag-results"),
};
let chosenImage = null;

export function initTag() {
  imageInput($.image, $.drop, (file) => {
    chosenImage = file;
    preview($.preview, file);
  });
  $.labelSet.addEventListener("change", syncLabelInput);
  $.multi.addEventListener("change", () => { $.threshold.disabled = !$.multi.checked; });
  $.threshold.disabled = true;
  $.form.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded($.error, tag);
  });
}

/** The label sets: the active bundle's and those created through the API. */
export async function refreshTag() {
  await guarded($.error, async () => {
    const sets = await api("/v1/label-sets");
    const chosen = $.labelSet.value;
    const group = (title, names) => h("optgroup", { label: title },
      ...names.map((name) => h("option", { value: name }, name)));
    $.labelSet.replaceChildren(h("option", { value: "" }, "the labels typed here"),
      group("the model's label sets", Object.keys(sets.model)),
      group("created through the API", Object.keys(sets.api)));
    $.labelSet.value = [...$.labelSet.options].some((o) => o.value === chosen) ? chosen : "";
    syncLabelInput();
  });
}

function syncLabelInput() {
  $.labels.disabled = $.labelSet.value !== "";
}

async function tag() {
  if (!chosenImage) throw new Refusal("choose or drop an image first");
  if (!$.labelSet.value && !typedList($.labels.value, ",").length) {
    throw new Refusal("type some labels (comma-separated) or choose a label set");
  }
  await checkUpload(chosenImage, { asJson: false });
  $.status.textContent = `Tagging ${chosenImage.name}…`;
  $.table.hidden = true;
  let answer;
  try {
    answer = await api("/v1/classify", { method: "POST", form: formOf(chosenImage) });
  } finally {
    $.status.textContent = "";
  }
  const { labels } = answer.results[0];
  const mode = $.multi.checked ? `every label with probability ≥ ${$.threshold.value}` : `top ${labels.length}`;
  $.status.textContent = `${chosenImage.name}: ${mode}, model ${answer.model}.`;
  showLabels(labels);
}

/** The multipart request: the file plus the options as form fields (labels and templates as JSON lists). */
function formOf(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  if ($.labelSet.value) form.append("label_set", $.labelSet.value);
  else form.append("labels", JSON.stringify(typedList($.labels.value, ",")));
  const templates = typedList($.templates.value, "\n");
  if (templates.length) form.append("templates", JSON.stringify(templates));
  form.append("top_k", String(numberOf($.topK, 5)));
  form.append("multi_label", String($.multi.checked));
  if ($.multi.checked) form.append("threshold", String(numberOf($.threshold, 0.1)));
  return form;
}

function typedList(text, separator) {
  return text.split(separator).map((s) => s.trim()).filter(Boolean);
}

function showLabels(labels) {
  const rows = labels.map((l) => h("tr", {},
    h("th", { scope: "row" }, l.label),
    h("td", {}, bar(l.probability, 0, 1, `probability of ${l.label}`)),
    h("td", {}, bar(l.cosine, -1, 1, `cosine of ${l.label}`))));
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "3" }, "no label reaches the threshold")));
  $.table.tBodies[0].replaceChildren(...rows);
  $.table.hidden = false;
  clearError($.error);
}
