// The rating page: ask for a rater id, then show the next unrated pair, vote with <- -> = or the buttons.
"use strict";
const $ = (id) => document.getElementById(id);
let rater = null, current = null, busy = false;

function show(section) {
  for (const id of ["login", "rating", "done"]) $(id).hidden = id !== section;
}

function fail(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function render(state) {
  $("bar").style.width = `${(100 * state.voted) / state.total}%`;
  $("count").textContent = `${state.voted} / ${state.total} rated`;
  $("who").textContent = state.rater;
  if (state.done) {
    current = null;
    $("thanks").textContent = `All ${state.total} pairs rated. Thank you!`;
    show("done");
    return;
  }
  current = state.pair;
  $("prompt").textContent = `\u201c${state.prompt}\u201d`;
  $("left").src = state.left;
  $("right").src = state.right;
  document.body.dataset.pair = state.pair;
  show("rating");
}

async function start(id) {
  rater = id;
  localStorage.setItem("safe-dit-rater", id);
  $("error").hidden = true;
  try {
    render(await call(`/api/next?rater=${encodeURIComponent(id)}`));
  } catch (err) {
    fail(err.message);
    show("login");
  }
}

async function vote(choice) {
  if (busy || current === null) return;
  busy = true;
  document.body.dataset.busy = "1";
  try {
    render(await call("/api/vote", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rater, pair: current, choice }),
    }));
    $("error").hidden = true;
  } catch (err) {
    fail(`vote not recorded: ${err.message}`);
    await start(rater);  // back in step with the server
  } finally {
    busy = false;
    delete document.body.dataset.busy;
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  start($("rater").value.trim());
});
for (const button of document.querySelectorAll(".choices button")) {
  button.addEventListener("click", () => vote(button.dataset.choice));
}
document.addEventListener("keydown", (event) => {
  if ($("rating").hidden || event.target.tagName === "INPUT") return;
  const choice = { ArrowLeft: "left", ArrowRight: "right", "=": "same" }[event.key];
  if (choice) {
    event.preventDefault();
    vote(choice);
  }
});
$("switch").addEventListener("click", (event) => {
  event.preventDefault();
  localStorage.removeItem("safe-dit-rater");
  rater = current = null;
  show("login");
});

const remembered = new URLSearchParams(location.search).get("rater") || localStorage.getItem("safe-dit-rater");
if (remembered) {
  $("rater").value = remembered;
  start(remembered);
}
