// The search page: asks /api/search, draws one tile per hit, plays a hit in place on click.
// Every element is built with DOM calls and every piece of data goes in through textContent
// or a URL attribute: a file name such as `<img onerror=...>.mp4` stays text.
"use strict";

const form = document.getElementById("search-form");
const queryBox = document.getElementById("q");
const topBox = document.getElementById("top");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

let playing = null; // the tile now showing a <video>: {stop()}
let searchCount = 0; // answers to older searches are dropped

function setState(state, message) {
  document.body.dataset.state = state;
  statusLine.textContent = message;
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = seconds - 60 * m;
  return `${m}:${s.toFixed(1).padStart(4, "0")}`;
}

function stopPlaying() {
  if (playing) playing.stop();
  playing = null;
}

function play(tile, media, hit) {
  stopPlaying();
  const video = document.createElement("video");
  video.controls = true;
  video.autoplay = true;
  video.preload = "auto";
  video.src = hit.video_url; // carries #t=start,end for a segment
  video.addEventListener("error", () => {
    const note = tile.querySelector(".error") || tile.appendChild(element("p", "error"));
    note.textContent = "This browser cannot play the file (codec or container).";
  });
  media.replaceWith(video);
  playing = {
    stop() {
      video.pause();
      video.removeAttribute("src");
      video.load(); // releases the connection
      video.replaceWith(media);
    },
  };
}

function tile(hit) {
  const li = element("li", "tile");
  li.dataset.rank = String(hit.rank);
  li.dataset.path = hit.path;
  if (hit.score !== null) li.dataset.score = String(hit.score);

  const media = element("button", "media");
  media.type = "button";
  media.title = `Play ${hit.path}`;
  const img = document.createElement("img");
  img.alt = hit.path;
  img.decoding = "async";
  img.src = hit.thumb_url;
  media.appendChild(img);
  media.addEventListener("click", () => play(li, media, hit));

  const caption = element("div", "caption");
  const meta = element("div", "meta");
  meta.appendChild(element("span", "rank", `#${hit.rank}`));
  meta.appendChild(
    element("span", "score", hit.score === null ? "score n/a" : hit.score.toFixed(4)),
  );
  if (hit.start !== null) {
    const end = hit.end === null ? "" : clock(hit.end);
    meta.appendChild(element("span", "segment", `${clock(hit.start)}\u2013${end}`));
  }
  caption.appendChild(meta);
  caption.appendChild(element("div", "path", hit.path));
  li.appendChild(media);
  li.appendChild(caption);
  return li;
}

async function search(text, top) {
  const mine = ++searchCount;
  stopPlaying();
  setState("loading", "Searching\u2026");
  const params = new URLSearchParams({ q: text, top: String(top) });
  history.replaceState(null, "", `?${params}`);
  let body;
  try {
    const response = await fetch(`/api/search?${params}`);
    body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  } catch (err) {
    if (mine === searchCount) {
      results.replaceChildren();
      setState("error", `Search failed: ${err.message}`);
    }
    return;
  }
  if (mine !== searchCount) return;
  results.replaceChildren(...body.results.map(tile));
  const n = body.count;
  setState(
    "done",
    `${n} result${n === 1 ? "" : "s"} for \u201c${body.query}\u201d in ` +
      `${body.latency_ms.toFixed(1)} ms`,
  );
}

function describe(info) {
  document.getElementById("index-info").textContent =
    `${info.count} videos indexed under ${info.root}`;
  const list = document.getElementById("model");
  list.replaceChildren();
  for (const [key, value] of Object.entries(info.description || {})) {
    list.appendChild(element("dt", "", key));
    const text = value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
    list.appendChild(element("dd", "", text));
  }
  const limits = info.limits || {};
  if (limits.max_top) topBox.max = String(limits.max_top);
  if (limits.max_query_chars) queryBox.maxLength = limits.max_query_chars;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = queryBox.value.trim();
  if (text) search(text, Number(topBox.value) || 20);
});

fetch("/api/info")
  .then((r) => r.json())
  .then(describe)
  .catch((err) => {
    document.getElementById("index-info").textContent = `Index description unavailable: ${err}`;
  });

// A page opened as /?q=...&top=... (a reload, a shared link) runs its search.
const initial = new URLSearchParams(location.search);
if (initial.get("q")) {
  queryBox.value = initial.get("q");
  if (initial.get("top")) topBox.value = initial.get("top");
  search(queryBox.value.trim(), Number(topBox.value) || 20);
}
