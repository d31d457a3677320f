// Kingpost console: live updates by polling the console's read-through of the API, the
// logs panel and the playground. No framework; the session cookie does the auth.
"use strict";
(function () {
  const root = "/console";
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  async function getJSON(path) {
    const resp = await fetch(root + "/data/" + path, { headers: { "X-Requested-With": "fetch" } });
    const data = await resp.json().catch(() => ({}));
    if (resp.status === 401 && data.sign_in) { window.location.assign(data.sign_in); }
    if (!resp.ok) { throw new Error(data.error || ("HTTP " + resp.status)); }
    return data;
  }

  function statusBadge(status) {
    const span = document.createElement("span");
    span.className = "status status-" + status.toLowerCase();
    span.textContent = status;
    return span;
  }

  function replicas(d, withStarting) {
    const f = (v) => (v === null || v === undefined ? "–" : String(v));
    return withStarting
      ? f(d.replicas_ready) + " / " + f(d.replicas_starting) + " / " + f(d.replicas_wanted)
      : f(d.replicas_ready) + " / " + f(d.replicas_wanted);
  }

  function showDeployment(d, withStarting) {
    document.querySelectorAll('[data-dep-status="' + d.id + '"]').forEach((el) => {
      if (el.textContent.trim() !== d.status) { el.replaceChildren(statusBadge(d.status)); }
    });
    document.querySelectorAll('[data-dep-replicas="' + d.id + '"]').forEach((el) => {
      el.textContent = replicas(d, withStarting);
    });
    document.querySelectorAll('[data-dep-envs="' + d.id + '"]').forEach((el) => {
      el.textContent = d.environments.join(", ") || "none";
    });
  }

  function every(ms, fn) {
    let busy = false;
    const tick = async () => {
      if (busy || document.hidden) { return; }
      busy = true;
      try { await fn(); } catch (e) { /* shown by the next successful poll */ } finally { busy = false; }
    };
    setInterval(tick, ms);
  }

  const depsBox = document.querySelector("[data-poll-deployments]");
  if (depsBox) {
    const model = depsBox.dataset.pollDeployments;
    every(2000, async () => {
      // Lists come under a key, as Baseten's management API gives them.
      const deps = (await getJSON("models/" + encodeURIComponent(model) + "/deployments")).deployments;
      const names = {};
      deps.forEach((d) => { names[d.id] = d.name; showDeployment(d, false); });
      const envs = (await getJSON("models/" + encodeURIComponent(model) + "/environments")).environments;
      envs.forEach((e) => {
        const cell = document.querySelector('[data-env-deployment="' + CSS.escape(e.name) + '"]');
        if (cell) { cell.textContent = e.deployment_id ? (names[e.deployment_id] || e.deployment_id) : "none"; }
      });
    });
  }

  const depBox = document.querySelector("[data-poll-deployment]");
  if (depBox) {
    const id = depBox.dataset.pollDeployment;
    every(2000, async () => showDeployment(await getJSON("deployments/" + encodeURIComponent(id)), true));
  }

  const envBox = document.querySelector("[data-poll-env]");
  if (envBox) {
    const path = envBox.dataset.pollEnv;
    let seen = null;
    every(3000, async () => {
      const env = await getJSON("models/" + path);
      const now = JSON.stringify([env.deployment_id, env.rollout]);
      if (seen !== null && now !== seen && !document.activeElement.closest("form")) {
        window.location.reload();  // the environment moved: show it whole
      }
      seen = now;
    });
  }

  const logs = document.getElementById("logs");
  if (logs) {
    const out = document.getElementById("log-lines");
    const err = document.getElementById("log-error");
    const dep = logs.dataset.deployment;
    const load = async () => {
      const params = new URLSearchParams({ deployment: dep, limit: "300" });
      for (const name of ["level", "source", "search", "request_id"]) {
        const v = logs.elements[name].value.trim();
        if (v) { params.set(name, v); }
      }
      try {
        const data = await getJSON("logs?" + params.toString());
        err.hidden = true;
        const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
        out.textContent = data.lines.map((r) => {
          const t = new Date(r.ts * 1000).toISOString().slice(11, 23);
          const rid = r.request_id ? " [" + r.request_id + "]" : "";
          return t + " " + (r.level || "").padEnd(7) + " " + (r.source || "") + rid + " " + r.message;
        }).join("\n");
        if (atEnd) { out.scrollTop = out.scrollHeight; }
      } catch (e) {
        err.textContent = e.message;
        err.hidden = false;
      }
    };
    logs.addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
    load();
    every(1500, async () => { if (logs.elements.follow.checked) { await load(); } });
  }

  // Charts: two polls of the running totals make one point (a rate, a share, p50/p99).
  function quantile(q, buckets) {  // buckets: [[le or null for +Inf, cumulative count]]
    if (!buckets.length) { return null; }
    const total = buckets[buckets.length - 1][1];
    if (total <= 0) { return null; }
    const rank = q * total;
    let lower = 0, below = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (le === null) { return lower; }
        if (count === below) { return le; }
        return lower + (le - lower) * (rank - below) / (count - below);
      }
      lower = le; below = count;
    }
    return null;
  }

  function draw(id, series, unit) {
    const svg = document.getElementById("chart-" + id);
    const all = series.flat().filter((v) => v !== null);
    const top = Math.max(1e-9, ...all) * 1.1;
    svg.replaceChildren();
    // Bars, one slot per poll (newest at the right); a second series sits beside the first.
    const slot = 300 / 60;
    const width = (slot * 0.8) / series.length;
    series.forEach((points, i) => {
      const offset = 60 - points.length;
      points.forEach((v, n) => {
        if (v === null || v === undefined) { return; }
        const h = Math.max(1, (v / top) * 76);
        const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
        bar.setAttribute("class", "s" + i);
        bar.setAttribute("x", ((offset + n) * slot + slot * 0.1 + i * width).toFixed(2));
        bar.setAttribute("y", (80 - h).toFixed(2));
        bar.setAttribute("width", width.toFixed(2));
        bar.setAttribute("height", h.toFixed(2));
        svg.appendChild(bar);
      });
    });
    const now = series.map((s) => s.length ? s[s.length - 1] : null)
      .map((v) => (v === null ? "–" : (Math.round(v * 100) / 100) + unit)).join(" / ");
    document.getElementById("chart-" + id + "-now").textContent = now;
    svg.setAttribute("aria-label", svg.getAttribute("aria-label").split(":")[0] + ": now " + now);
  }

  const charts = document.getElementById("charts");
  if (charts) {
    const params = new URLSearchParams({ model: charts.dataset.model, deployment: charts.dataset.deployment });
    const data = { rps: [], p50: [], p99: [], errors: [], ready: [] };
    let last = null;
    const push = (name, v) => { data[name].push(v); if (data[name].length > 60) { data[name].shift(); } };
    // One bar from two samples of the running totals: the rate, errors and latency between.
    const step = (before, cur) => {
      const dt = Math.max(0.001, cur.t - before.t);
      const prev = new Map(before.buckets.map(([le, n]) => [le, n]));
      const delta = cur.buckets.map(([le, n]) => [le, n - (prev.get(le) || 0)]);
      const ms = (v) => (v === null ? null : v * 1000);
      push("rps", Math.max(0, cur.requests - before.requests) / dt);
      push("errors", Math.max(0, cur.errors - before.errors) / dt);
      push("p50", ms(quantile(0.5, delta)));
      push("p99", ms(quantile(0.99, delta)));
      push("ready", cur.ready);
    };
    const redraw = () => {
      draw("rps", [data.rps], "");
      draw("latency", [data.p50, data.p99], " ms");
      draw("errors", [data.errors], "");
      draw("ready", [data.ready], "");
    };
    const poll = async () => {
      // The first poll also takes the last hour the control plane kept (a bar a minute).
      const query = last ? params : new URLSearchParams([...params, ["history", "1"]]);
      const resp = await fetch(root + "/figures?" + query, { headers: { "X-Requested-With": "fetch" } });
      if (!resp.ok) { return; }
      const cur = await resp.json();
      const kept = cur.history || [];
      for (let i = 1; i < kept.length; i++) { step(kept[i - 1], kept[i]); }
      if (last) { step(last, cur); }
      if (last || kept.length > 1) { redraw(); }
      last = cur;
    };
    poll();
    every(5000, poll);  // each poll is a whole /metrics scrape: not more often than this
  }

  const play = document.getElementById("playground");
  if (play) {
    const out = document.getElementById("play-out");
    play.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = play.elements.body.value;
      try { JSON.parse(body); } catch (e) {
        document.getElementById("play-status").textContent = "not sent: the body is not JSON (" + e.message + ")";
        return;
      }
      out.textContent = "";
      document.getElementById("play-status").textContent = "sending…";
      const started = performance.now();
      const resp = await fetch(play.dataset.url, {
        method: "POST", body: body,
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "X-Requested-With": "fetch" },
      });
      document.getElementById("play-status").textContent = resp.status + " " + resp.statusText;
      document.getElementById("play-rid").textContent = resp.headers.get("X-Baseten-Request-Id") || "–";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) { break; }
        out.textContent += decoder.decode(value, { stream: true });
      }
      document.getElementById("play-time").textContent = Math.round(performance.now() - started) + " ms";
    });
  }
})();
