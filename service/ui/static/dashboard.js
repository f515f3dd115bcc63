// The dashboard's one script (GET /ui): it calls the service's own JSON API like any client and
// builds the page from the answers. Everything it inserts goes in through textContent or DOM
// attributes, never parsed as markup, and the page's Content-Security-Policy allows no inline script.
// With API keys on, a 401 opens the key form; the key stays in sessionStorage (this tab only) and
// is sent as X-API-Key. `window.CalibDashboard.renderTimeline(points)` draws the monitoring chart
// (inline SVG) from the timeline endpoint's points; tests call it on fixtures.
"use strict";

(function () {
  const KEY_STORAGE = "calib-dashboard-api-key";
  const KEY_HEADER = "X-API-Key";
  const TIMELINE_QUERY = "bucket=100&buckets=20";
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  // --- talking to the API ----------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE);
    } catch (e) {
      return null;
    }
  }

  async function request(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    if (key) headers.set(KEY_HEADER, key);
    const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = response.statusText || "HTTP " + response.status;
      try {
        const body = await response.json();
        if (body && typeof body.error === "object" && body.error !== null) {
          code = String(body.error.code || code);
          message = String(body.error.message || message);
        } else if (body && body.error) {
          message = String(body.error);
        }
      } catch (e) {
        // not JSON: keep the status text
      }
      throw new ApiError(response.status, code, message);
    }
    return response;
  }

  async function getJson(path, options) {
    return (await request(path, options)).json();
  }

  const objectUrls = new Map(); // img id -> its current blob: URL (revoked when replaced)

  async function showImage(imgId, path, options) {
    const blob = await (await request(path, options)).blob();
    const img = $(imgId);
    const loaded = new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the diagram could not be decoded"));
    });
    const url = URL.createObjectURL(blob);
    if (objectUrls.has(imgId)) URL.revokeObjectURL(objectUrls.get(imgId));
    objectUrls.set(imgId, url);
    img.src = url;
    img.hidden = false;
    await loaded;
  }

  function errorText(e) {
    if (e instanceof ApiError) return e.message + " (" + e.status + " " + e.code + ")";
    return String(e && e.message ? e.message : e);
  }

  // every panel's catch: a 401 opens the key form, anything else is said in the panel
  function report(errorId, e) {
    if (e instanceof ApiError && e.status === 401) {
      askForKey(e.message);
      return;
    }
    $(errorId).textContent = errorText(e);
  }

  // --- small DOM helpers -------------------------------------------------------------------------
  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function percent(x) {
    return typeof x === "number" && isFinite(x) ? (100 * x).toFixed(2) + "%" : "–";
  }

  function number(x, digits) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
  }

  function beforeAfter(before, after) {
    return percent(before) + " → " + percent(after);
  }

  function cell(text, value) {
    const td = el("td", text);
    if (typeof value === "number") td.dataset.value = String(value);
    return td;
  }

  function term(list, name, value) {
    const dd = el("dd", value);
    list.append(el("dt", name), dd);
    return dd;
  }

  // --- the key prompt ------------------------------------------------------------------------------
  function askForKey(message) {
    $("key-panel").hidden = false;
    $("key-error").textContent = message || "";
    $("status").textContent = "This service needs an API key.";
    $("key-input").focus();
  }

  function setUpKeyForm() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key-input").value = "";
      $("key-error").textContent = "";
      loadModels();
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("key-error").textContent = "The key is forgotten.";
    });
  }

  // --- models and their cards ------------------------------------------------------------------------
  let models = [];

  function testMetrics(metrics) {
    const m = metrics || {};
    return { before: m.test_before_temperature || {}, after: m.test_after_temperature || {} };
  }

  async function loadModels() {
    $("models-error").textContent = "";
    $("status").textContent = "Loading the models…";
    let answer;
    try {
      answer = await getJson("/v1/models");
    } catch (e) {
      report("models-error", e);
      if (!(e instanceof ApiError && e.status === 401)) $("status").textContent = "";
      return;
    }
    $("key-panel").hidden = true;
    models = answer.models || [];
    const body = $("models-table").tBodies[0];
    body.replaceChildren();
    const select = $("model-select");
    const previous = select.value;
    select.replaceChildren();
    for (const model of models) {
      const { before, after } = testMetrics(model.metrics);
      const row = el("tr");
      row.append(el("th", model.name, { scope: "row" }), cell(model.version !== undefined ? model.version : "–"),
                 cell(percent(after.accuracy), after.accuracy), cell(beforeAfter(before.ece, after.ece), after.ece),
                 cell(number(model.temperature, 4), model.temperature), cell(model.runtime));
      body.append(row);
      select.append(el("option", model.name, { value: model.name }));
    }
    $("status").textContent = models.length + " model(s) loaded.";
    if (!models.length) return;
    select.value = models.some((m) => m.name === previous) ? previous : models[0].name;
    await showModel(select.value);
  }

  async function showModel(name) {
    await Promise.all([loadCard(name), loadProfiles(name), loadMonitoring(name)]);
  }

  async function loadCard(name) {
    const list = $("card");
    list.replaceChildren();
    $("card-error").textContent = "";
    $("card-diagram").hidden = true;
    $("card-heading").textContent = "Model card: " + name;
    try {
      const card = await getJson("/v1/models/" + enc(name));
      const { before, after } = testMetrics(card.metrics);
      term(list, "name", card.name);
      if (card.version !== undefined && card.version !== null) term(list, "version", card.version);
      term(list, "sha256", card.model_sha256 || "–").classList.add("digest");
      term(list, "temperature", number(card.temperature, 4));
      term(list, "test accuracy", percent(after.accuracy));
      term(list, "test ECE-15, before → after T", beforeAfter(before.ece, after.ece));
      term(list, "test NLL, before → after T", number(before.nll, 4) + " → " + number(after.nll, 4));
      term(list, "test Brier, before → after T", number(before.brier, 4) + " → " + number(after.brier, 4));
      term(list, "test images", after.n !== undefined ? after.n : "–");
      term(list, "runtime", card.runtime || "–");
      if (card.ood_threshold) term(list, "OOD threshold (entropy, nats)", number(card.ood_threshold.threshold, 4));
      if (Array.isArray(card.classes)) term(list, "classes", card.classes.join(", "));
    } catch (e) {
      report("card-error", e);
      return;
    }
    try {
      await showImage("card-diagram", "/v1/models/" + enc(name) + "/reliability.png");
    } catch (e) {
      report("card-error", e);
    }
  }

  // --- profiles ------------------------------------------------------------------------------------------
  async function loadProfiles(name) {
    const body = $("profiles-table").tBodies[0];
    body.replaceChildren();
    $("profiles-error").textContent = "";
    $("profiles-empty").hidden = true;
    const select = $("evaluate-calibration");
    while (select.options.length > 1) select.remove(1);
    let answer;
    try {
      answer = await getJson("/v1/models/" + enc(name) + "/calibrations");
    } catch (e) {
      report("profiles-error", e);
      return;
    }
    const profiles = answer.calibrations || [];
    $("profiles-empty").hidden = profiles.length > 0;
    for (const profile of profiles) {
      const rep = profile.report || {};
      const before = rep.before || {};
      const after = rep.after || {};
      const row = el("tr");
      row.append(el("th", profile.id, { scope: "row", class: "digest" }), cell(profile.label || "–"),
                 cell(profile.method), cell(profile.n, profile.n), cell(String(profile.created_at).replace("T", " ").slice(0, 19)),
                 cell(beforeAfter(before.ece_15, after.ece_15), after.ece_15),
                 cell(beforeAfter(before.accuracy, after.accuracy), after.accuracy));
      body.append(row);
      const labelText = (profile.label ? profile.label + " — " : "") + profile.method + " (" + profile.id.slice(0, 8) + ")";
      select.append(el("option", "profile " + labelText, { value: profile.id }));
    }
  }

  // --- monitoring ----------------------------------------------------------------------------------------
  function describe(reason) {
    if (typeof reason === "string") return reason;
    if (reason && typeof reason.message === "string") return reason.message;
    return JSON.stringify(reason);
  }

  async function loadMonitoring(name) {
    const status = $("monitoring-status");
    status.textContent = "";
    $("drift-reasons").replaceChildren();
    $("timeline").replaceChildren();
    $("monitoring-error").textContent = "";
    const base = "/v1/models/" + enc(name) + "/monitoring";
    let summary;
    try {
      summary = await getJson(base);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        status.textContent = "monitoring not available";
        return;
      }
      if (e instanceof ApiError && e.code === "monitoring_disabled") {
        status.textContent = "monitoring is off on this service";
        return;
      }
      report("monitoring-error", e);
      return;
    }
    const drift = summary.drift || {};
    const alert = summary.alert || {};
    status.textContent = "drift: " + (drift.status !== undefined ? drift.status : "–")
      + "; alert: " + (alert.status !== undefined ? alert.status : "–");
    for (const reason of drift.reasons || []) $("drift-reasons").append(el("li", describe(reason)));
    try {
      const timeline = await getJson(base + "/timeline?" + TIMELINE_QUERY);
      $("timeline").replaceChildren(renderTimeline(timeline.points || []));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        $("timeline").replaceChildren(el("p", "monitoring timeline not available"));
        return;
      }
      report("monitoring-error", e);
    }
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const SERIES = [
    { key: "estimated_accuracy", label: "estimated accuracy", className: "series-estimated" },
    { key: "observed_accuracy", label: "observed accuracy", className: "series-observed" },
    { key: "ece_15", label: "ECE-15", className: "series-ece" },
  ];

  // The monitoring window over time as an SVG element: one point per bucket (oldest first) with
  // keys end, predictions, estimated_accuracy, observed_accuracy|null, ece_15|null, labelled, drift,
  // alert. The three series share one 0-100% axis; a missing value breaks its line; buckets with
  // drift get a shaded band, with an alert a marker on top.
  function renderTimeline(points) {
    const width = 760, height = 280;
    const left = 48, right = 16, top = 28, bottom = 44;
    const plotW = width - left - right, plotH = height - top - bottom;
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, role: "img",
                              "aria-labelledby": "timeline-title", class: "timeline" });
    root.append(svg("title", { id: "timeline-title" },
                    "Monitoring window over time: estimated and observed accuracy, ECE-15, drift and alerts"));
    const n = points.length;
    if (!n) {
      root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
                      "no predictions in the window yet"));
      return root;
    }
    const step = plotW / n;
    const x = (i) => left + step * (i + 0.5);
    const y = (v) => top + plotH * (1 - Math.min(1, Math.max(0, v)));

    for (let i = 0; i < n; i++) {   // drift bands first: behind everything
      if (points[i].drift) {
        root.append(svg("rect", { x: left + step * i, y: top, width: step, height: plotH, class: "drift-band",
                                  "data-index": i }));
      }
    }
    for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
      root.append(svg("line", { x1: left, x2: left + plotW, y1: y(tick), y2: y(tick), class: "grid" }));
      root.append(svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick" },
                      Math.round(tick * 100) + "%"));
    }
    const time = (iso) => (typeof iso === "string" && iso.length >= 16 ? iso.slice(11, 16) : String(iso));
    const labelEvery = Math.max(1, Math.ceil(n / 8));
    for (let i = 0; i < n; i += labelEvery) {
      root.append(svg("text", { x: x(i), y: top + plotH + 16, "text-anchor": "middle", class: "tick" },
                      time(points[i].end)));
    }
    root.append(svg("text", { x: left + plotW / 2, y: height - 8, "text-anchor": "middle", class: "axis-label" },
                    "end of bucket (UTC)"));

    for (const series of SERIES) {
      const group = svg("g", { class: series.className, "data-series": series.key });
      let run = [];
      const flush = () => {
        if (run.length > 1) group.append(svg("polyline", { points: run.join(" "), fill: "none" }));
        run = [];
      };
      points.forEach((p, i) => {
        const v = p[series.key];
        if (typeof v !== "number" || !isFinite(v)) {
          flush();
          return;
        }
        run.push(x(i).toFixed(1) + "," + y(v).toFixed(1));
        const dot = svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 3, "data-index": i,
                                    "data-value": v });
        dot.append(svg("title", {}, series.label + " " + percent(v) + " at " + p.end + " ("
                                    + p.predictions + " predictions, " + p.labelled + " labelled)"));
        group.append(dot);
      });
      flush();
      root.append(group);
    }
    points.forEach((p, i) => {
      if (p.alert) {
        const marker = svg("text", { x: x(i), y: top - 6, "text-anchor": "middle", class: "alert-marker",
                                     "data-index": i }, "▲");
        marker.append(svg("title", {}, "alert at " + p.end));
        root.append(marker);
      }
    });
    const legend = svg("g", { class: "legend" });
    const entries = [...SERIES, { label: "drift", className: "legend-drift" }, { label: "▲ alert", className: "alert-marker" }];
    entries.forEach((entry, k) => {
      const lx = left + k * 140;
      if (entry.key) {
        legend.append(svg("line", { x1: lx, x2: lx + 18, y1: 10, y2: 10, class: entry.className + " swatch" }));
        legend.append(svg("text", { x: lx + 22, y: 14 }, entry.label));
      } else if (entry.className === "legend-drift") {
        legend.append(svg("rect", { x: lx, y: 4, width: 18, height: 12, class: "drift-band" }));
        legend.append(svg("text", { x: lx + 22, y: 14 }, entry.label));
      } else {
        legend.append(svg("text", { x: lx, y: 14, class: entry.className }, entry.label));
      }
    });
    root.append(legend);
    return root;
  }

  // --- evaluate --------------------------------------------------------------------------------------------
  const METRIC_ROWS = [
    ["accuracy", "accuracy", percent],
    ["ece", "ECE", percent],
    ["mce", "MCE", percent],
    ["adaptive_ece", "adaptive ECE", percent],
    ["classwise_ece", "classwise ECE", percent],
    ["nll", "NLL", (v) => number(v, 4)],
    ["brier", "Brier", (v) => number(v, 4)],
  ];

  function showReport(answer) {
    const columns = [["before", "before temperature (T = 1)", answer.before_temperature],
                     ["after", "after T = " + number(answer.temperature, 4), answer.after_temperature]];
    if (answer.after_fitted_temperature) {
      columns.push(["fitted", "after fitted T = " + number(answer.fitted_temperature, 4),
                    answer.after_fitted_temperature]);
    }
    if (answer.after_calibration) {
      const used = answer.calibration || {};
      columns.push(["profile", "after profile " + String(used.id || "").slice(0, 8) + " (" + (used.method || "") + ")",
                    answer.after_calibration]);
    }
    const head = $("evaluate-table").tHead.rows[0];
    head.replaceChildren(el("th", "metric", { scope: "col" }));
    for (const [, title] of columns) head.append(el("th", title, { scope: "col" }));
    const body = $("evaluate-table").tBodies[0];
    body.replaceChildren();
    for (const [key, label, format] of METRIC_ROWS) {
      const row = el("tr", null, { "data-metric": key });
      row.append(el("th", label, { scope: "row" }));
      for (const [column, , metrics] of columns) {
        const td = cell(format(metrics[key]), metrics[key]);
        td.dataset.column = column;
        row.append(td);
      }
      body.append(row);
    }
    $("evaluate-caption").textContent = answer.model + ": " + answer.n + " images, " + answer.n_bins + " bins";
    const warnings = $("evaluate-warnings");
    warnings.replaceChildren();
    for (const w of answer.warnings || []) warnings.append(el("li", w.message || w.code || JSON.stringify(w)));
    $("evaluate-report").hidden = false;
  }

  function setUpEvaluateForm() {
    $("evaluate-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("model-select").value;
      const file = $("evaluate-file").files[0];
      $("evaluate-error").textContent = "";
      if (!name || !file) {
        $("evaluate-error").textContent = name ? "Choose a file first." : "No model is loaded.";
        return;
      }
      const query = new URLSearchParams();
      if ($("evaluate-bins").value) query.set("bins", $("evaluate-bins").value);
      if ($("evaluate-fit").checked) query.set("fit_temperature", "true");
      if ($("evaluate-split").value.trim()) query.set("split", $("evaluate-split").value.trim());
      if ($("evaluate-calibration").value) query.set("calibration", $("evaluate-calibration").value);
      const form = new FormData();
      form.append("file", file, file.name);
      const path = "/v1/models/" + enc(name) + "/evaluate?";
      const button = $("evaluate-submit");
      button.disabled = true;
      $("evaluate-panel").setAttribute("aria-busy", "true");
      $("status").textContent = "Evaluating " + file.name + "…";
      try {
        const answer = await getJson(path + query, { method: "POST", body: form });
        showReport(answer);
        query.set("format", "png");   // the same batch again for its diagram
        await showImage("evaluate-diagram", path + query, { method: "POST", body: form });
        $("status").textContent = "Evaluated " + answer.n + " images.";
      } catch (e) {
        report("evaluate-error", e);
        $("status").textContent = "";
      } finally {
        button.disabled = false;
        $("evaluate-panel").removeAttribute("aria-busy");
      }
    });
  }

  window.CalibDashboard = Object.freeze({ renderTimeline, percent });

  document.addEventListener("DOMContentLoaded", () => {
    setUpKeyForm();
    setUpEvaluateForm();
    $("model-select").addEventListener("change", (event) => showModel(event.target.value));
    loadModels();
  });
})();
