// Shared by the dashboards: authenticated fetches, auto-refresh, formatting.
// No framework and nothing fetched from elsewhere: every asset is in the page.
"use strict";
const Backstop = (() => {
  // A bearer token may come once in the URL fragment (#token=...), which the
  // browser never sends to a server; it is kept for this tab only.
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("backstop-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = () => sessionStorage.getItem("backstop-token");

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token()) headers["Authorization"] = "Bearer " + token();
    const r = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
    if (r.status === 401) { showAuth(); throw new Error("unauthorized"); }
    return r;
  }

  function showAuth() {
    const box = document.getElementById("auth");
    if (!box || box.dataset.shown) return;
    box.dataset.shown = "1";
    box.style.display = "block";
    box.querySelector("form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem("backstop-token", box.querySelector("input").value);
      location.reload();
    });
  }

  // Calls `load` now and then every chosen interval (kept per page).
  function autoRefresh(load) {
    const sel = document.getElementById("refresh");
    const key = "backstop-refresh-" + location.pathname;
    if (localStorage.getItem(key)) sel.value = localStorage.getItem(key);
    let timer = null;
    const status = document.getElementById("status");
    const run = async () => {
      try {
        await load();
        status.textContent = "updated " + new Date().toLocaleTimeString();
      } catch (e) {
        status.textContent = e.message === "unauthorized" ? "token needed" : "update failed: " + e.message;
      }
    };
    const arm = () => {
      clearInterval(timer);
      const s = Number(sel.value);
      if (s > 0) timer = setInterval(run, s * 1000);
    };
    sel.addEventListener("change", () => { localStorage.setItem(key, sel.value); arm(); run(); });
    arm();
    run();
    return run;
  }

  const fmt = {
    int: (n) => (n ?? 0).toLocaleString("en-US"),
    ms: (v) => v == null ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : v >= 10 ? v.toFixed(0) + " ms" : v.toFixed(1) + " ms",
    pct: (a, b) => b ? (100 * a / b).toFixed(1) + " %" : "–",
    age: (s) => s < 60 ? s.toFixed(0) + " s" : s < 3600 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h",
  };

  function esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  const statusClass = (code) => "s" + String(code)[0] + "xx";
  const statusColor = (code) => `var(--${statusClass(code)}, #98a2b3)`;

  // A stacked bar of status codes grouped by class.
  function statusBar(codes) {
    const groups = {};
    let total = 0;
    for (const [code, n] of Object.entries(codes || {})) {
      const k = String(code)[0] + "xx";
      groups[k] = (groups[k] || 0) + n;
      total += n;
    }
    if (!total) return '<div class="bar"></div>';
    const parts = Object.keys(groups).sort().map((k) =>
      `<span title="${k}: ${groups[k]}" style="width:${(100 * groups[k] / total).toFixed(2)}%;background:var(--s${k}, #98a2b3)"></span>`);
    return `<div class="bar">${parts.join("")}</div>`;
  }

  return { api, autoRefresh, fmt, esc, statusBar, statusColor };
})();
