// The page's entry point: the API key bar, the tabs (WAI-ARIA tabs: arrow keys, Home, End), and a last-resort
// error region so that no failure is console-only.

import { storedKey, storeKey } from "./api.js";
import { clearError, byId, showError } from "./dom.js";
import { initClusters, refreshClusters } from "./clusters.js";
import { initModels, setModelsVisible } from "./models.js";
import { initSearch, refreshSearch } from "./search.js";
import { initTag, refreshTag } from "./tag.js";

const TABS = ["search", "tag", "clusters", "models"];
// what each tab loads when shown or when the key changes
const REFRESH = {
  search: refreshSearch, tag: refreshTag, clusters: refreshClusters, models: () => setModelsVisible(true),
};
const pageError = byId("page-error");
let currentTab = null;

function initKey() {
  const form = byId("key-form");
  const input = byId("api-key");
  const status = byId("key-status");
  const describe = () => { status.textContent = storedKey() ? "key saved in this browser" : "no key saved"; };
  input.value = storedKey();
  describe();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(input.value.trim());
    describe();
    clearError(pageError);
    REFRESH[currentTab]();
  });
  byId("forget-key").addEventListener("click", () => {
    input.value = "";
    storeKey("");
    describe();
  });
}

function tabButton(name) {
  return byId(`tab-${name}`);
}

/** Show tab `name`; `focus` when the keyboard moved to it. The tab is kept in the address (`?tab=`). */
function selectTab(name, { focus = false, remember = true } = {}) {
  if (name === currentTab) return;
  if (currentTab === "models") setModelsVisible(false);
  currentTab = name;
  for (const other of TABS) {
    const selected = other === name;
    const button = tabButton(other);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    byId(`panel-${other}`).hidden = !selected;
  }
  if (focus) tabButton(name).focus();
  if (remember) rememberTab(name);
  REFRESH[name]();
}

function rememberTab(name) {
  const params = new URLSearchParams(location.search);
  if ((params.get("tab") ?? "search") === name) return;
  // another tab's query stays out of the address: the link shares what is on screen
  history.pushState(null, "", `${location.pathname}?${new URLSearchParams({ tab: name })}`);
}

function initTabs() {
  const keys = { ArrowRight: 1, ArrowLeft: -1 };
  for (const [index, name] of TABS.entries()) {
    const button = tabButton(name);
    button.addEventListener("click", () => selectTab(name));
    button.addEventListener("keydown", (event) => {
      const to = event.key === "Home" ? 0 : event.key === "End" ? TABS.length - 1
        : event.key in keys ? (index + keys[event.key] + TABS.length) % TABS.length : null;
      if (to === null) return;
      event.preventDefault();
      selectTab(TABS[to], { focus: true });
    });
  }
  // back / forward: show the address's tab, and let it repeat the address's query
  window.addEventListener("popstate", () => {
    const name = tabInAddress();
    if (name === currentTab) REFRESH[name]();
    else selectTab(name, { remember: false });
  });
}

function tabInAddress() {
  const name = new URLSearchParams(location.search).get("tab");
  return TABS.includes(name) ? name : "search";
}

function catchStrays() {
  const show = (error) => showError(pageError, error ?? new Error("unknown error"));
  window.addEventListener("error", (event) => show(event.error ?? new Error(event.message)));
  window.addEventListener("unhandledrejection", (event) => show(event.reason));
}

catchStrays();
initKey();
initSearch();
initTag();
initClusters();
initModels();
initTabs();
selectTab(tabInAddress(), { remember: false });
