// modelloop ui: curves drawn from a run's metrics.jsonl, a running run's page kept current,
// the launch form and the playground. Plain browser JavaScript: nothing to build.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
const SVG = "http://www.w3.org/2000/svg";

function element(name, attributes, parent) {
  const made = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) made.setAttribute(key, value);
  if (parent) parent.appendChild(made);
  return made;
}

function short(value) {
  return Math.abs(value) >= 1000 || (Math.abs(value) < 0.01 && value !== 0) ? value.toExponential(2) : value.toFixed(3);
}

// One figure: a line per (run, metric) that has points; nothing at all if none has.
function draw(figure, series) {
  figure.querySelectorAll("svg, .legend").forEach((old) => old.remove());
  const lines = series.filter((line) => line.points.length);
  figure.hidden = lines.length === 0;
  if (!lines.length) return;
  const width = 460, height = 200, pad = 44;
  const all = lines.flatMap((line) => line.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - pad - 10);
  const sy = (y) => height - 24 - ((y - y0) / (y1 - y0)) * (height - 34);
  const svg = element("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "curve" }, figure);
  element("line", { x1: pad, y1: height - 24, x2: width - 10, y2: height - 24, class: "axis" }, svg);
  element("line", { x1: pad, y1: 10, x2: pad, y2: height - 24, class: "axis" }, svg);
  for (const [value, y] of [[y1, 14], [y0, height - 26]]) {
    element("text", { x: pad - 4, y, "text-anchor": "end", class: "tick" }, svg).textContent = short(value);
  }
  for (const [value, x, anchor] of [[x0, pad, "start"], [x1, width - 10, "end"]]) {
    element("text", { x, y: height - 8, "text-anchor": anchor, class: "tick" }, svg).textContent = `step ${value}`;
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  lines.forEach((line, index) => {
    const color = COLORS[index % COLORS.length];
    const path = line.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    element("path", { d: path, stroke: color, class: "series", "data-series": line.label }, svg);
    const key = document.createElement("span");
    key.style.color = color;
    key.textContent = `${line.label}: ${short(line.points[line.points.length - 1][1])}`;
    legend.appendChild(key);
  });
  figure.appendChild(legend);
}

function seriesOf(rows, keys, prefix) {
  return keys.map((key) => ({
    label: prefix + key,
    points: rows.filter((row) => typeof row[key] === "number" && typeof row.step === "number").map((row) => [row.step, row[key]]),
  }));
}

async function metricsOf(run, after) {
  const answer = await fetch(`/api/metrics?run=${encodeURIComponent(run)}&after=${after}`);
  return answer.json();
}

// A run's page (or two runs' comparison): the curves, then, while it runs, every 2 s.
async function followPlots(section) {
  const runs = (section.dataset.runs || section.dataset.run).split("|");
  const figures = [...section.querySelectorAll("figure.plot")];
  const rows = runs.map(() => []);
  let status = null;
  for (;;) {
    for (const [index, run] of runs.entries()) {
      const answer = await metricsOf(run, rows[index].length);
      rows[index].push(...answer.rows);
      if (runs.length === 1) {
        status = answer.status;
        const log = document.getElementById("log");
        if (log && answer.log !== undefined) log.textContent = answer.log;
        const shown = document.getElementById("status");
        if (shown && shown.textContent !== status) { shown.textContent = status; shown.className = `status ${status}`; }
      }
    }
    for (const figure of figures) {
      const keys = figure.dataset.keys.split(",");
      draw(figure, runs.flatMap((run, index) => seriesOf(rows[index], keys, runs.length > 1 ? `${run}: ` : "")));
    }
    if (section.dataset.live !== "yes") return;
    if (section.dataset.refresh === "yes") { setTimeout(() => location.reload(), 3000); return; }  // a recipe's stages
    if (status !== section.dataset.status) { location.reload(); return; }  // started, finished, stopped, resumed
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function formValues(form) {
  const values = {};
  for (const input of form.querySelectorAll("[name]")) {
    values[input.name] = input.type === "checkbox" ? input.checked : input.value;
  }
  return values;
}

function showErrors(form, errors) {
  form.querySelectorAll("[data-error]").forEach((slot) => { slot.textContent = ""; });
  form.querySelectorAll(".field").forEach((field) => field.classList.remove("invalid"));
  for (const [name, message] of Object.entries(errors || {})) {
    const slot = form.querySelector(`[data-error="${name}"]`) || form.querySelector('[data-error=""]');
    slot.textContent = message;
    const field = form.querySelector(`.field[data-field="${name}"]`);
    if (field) {
      field.classList.add("invalid");
      field.closest("details")?.setAttribute("open", "");
    }
  }
}

function setUpLaunch(form) {
  const stage = form.dataset.stage;
  const send = async (route) => {
    const answer = await fetch(`${route}?stage=${stage}`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(formValues(form)),
    });
    const body = await answer.json();
    showErrors(form, body.errors);
    return body;
  };
  document.getElementById("check").addEventListener("click", async (event) => {
    event.target.disabled = true;
    event.target.textContent = "Checking…";
    try {
      const body = await send("/api/check");
      const shown = document.getElementById("checks");
      shown.hidden = !body.checks;
      for (const [name, text] of Object.entries(body.checks || {})) document.getElementById(name).innerHTML = marked(text);
    } finally {
      event.target.disabled = false;
      event.target.textContent = "Check data and plan";
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = await send("/api/launch");
    if (body.run) location.href = `/run?id=${encodeURIComponent(body.run)}`;
  });
}

// `data preview` marks the trained text «like this» when it is not on a terminal.
function marked(text) {
  const escaped = text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return escaped.replace(/«([\s\S]*?)»/g, '<mark class="trained">$1</mark>');
}

function setUpPlayground(form) {
  const chats = [...document.querySelectorAll(".chat")].map((section) => ({ section, messages: [] }));
  const say = document.getElementById("say");
  const add = (chat, role, text) => {
    const bubble = document.createElement("div");
    bubble.className = `message ${role}`;
    bubble.textContent = text;
    chat.section.querySelector(".messages").appendChild(bubble);
    return bubble;
  };
  document.getElementById("clear").addEventListener("click", () => {
    for (const chat of chats) { chat.messages = []; chat.section.querySelector(".messages").replaceChildren(); }
  });
  say.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = say.text.value.trim();
    if (!text) return;
    say.text.value = "";
    const settings = formValues(form);
    await Promise.all(chats.map(async (chat) => {
      const model = chat.section.querySelector(".model").value;
      if (!model) return;
      chat.messages.push({ role: "user", content: text });
      add(chat, "user", text);
      const waiting = add(chat, "assistant pending", "…");
      const answer = await fetch("/api/chat", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ model, messages: chat.messages, ...settings }),
      });
      const body = await answer.json();
      waiting.classList.remove("pending");
      if (body.error) { waiting.classList.add("error"); waiting.textContent = body.error; chat.messages.pop(); return; }
      waiting.textContent = body.text || "(an empty answer)";
      chat.messages.push({ role: "assistant", content: body.text });
    }));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const plots = document.getElementById("plots");
  if (plots) followPlots(plots);
  const stop = document.getElementById("stop");
  if (stop) {
    stop.addEventListener("click", async () => {
      stop.disabled = true;
      const answer = await fetch(`/api/stop?run=${encodeURIComponent(stop.dataset.run)}`, { method: "POST" });
      stop.textContent = answer.ok ? "Stopping…" : "Not running";
    });
  }
  const resume = document.getElementById("resume");
  if (resume) {
    resume.addEventListener("click", async () => {
      resume.disabled = true;
      const answer = await fetch(`/api/resume?run=${encodeURIComponent(resume.dataset.run)}`, { method: "POST" });
      if (answer.ok) location.reload();
      else resume.textContent = (await answer.json()).error;
    });
  }
  const launch = document.getElementById("launch");
  if (launch) setUpLaunch(launch);
  const playground = document.getElementById("playground");
  if (playground) setUpPlayground(playground);
});
