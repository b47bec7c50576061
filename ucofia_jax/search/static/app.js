// The search page: asks /api/search, draws one tile per hit (its strip of frames, the moment's
// time, a bar marking the moment within the file), plays a hit in place on click, and says so
// when the best hit is no better than the collection's background ("no good match").
// Every element is built with DOM calls and every piece of data goes in through textContent
// or a URL attribute: a file name such as `<img onerror=...>.mp4` stays text.
"use strict";

const form = document.getElementById("search-form");
const queryBox = document.getElementById("q");
const topBox = document.getElementById("top");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const noMatch = document.getElementById("no-match");
const notice = document.getElementById("notice");

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

// The file as a bar, the moment as a marked span of it; nothing for a whole file or when the
// file's duration is unknown. Widths are set through the CSSOM (the CSP forbids inline style).
function timeBar(hit) {
  if (hit.start === null || hit.duration === null || !(hit.duration > 0)) return null;
  const end = hit.end === null ? hit.duration : hit.end;
  const from = Math.max(0, Math.min(1, hit.start / hit.duration));
  const to = Math.max(from, Math.min(1, end / hit.duration));
  const bar = element("div", "timebar");
  bar.title = `${clock(hit.start)}\u2013${clock(end)} of ${clock(hit.duration)}`;
  bar.dataset.from = from.toFixed(4);
  bar.dataset.to = to.toFixed(4);
  const span = element("div", "moment");
  span.style.left = `${(100 * from).toFixed(2)}%`;
  span.style.width = `${(100 * (to - from)).toFixed(2)}%`;
  bar.appendChild(span);
  return bar;
}

function tile(hit) {
  const li = element("li", "tile");
  li.dataset.rank = String(hit.rank);
  li.dataset.path = hit.path;
  if (hit.score !== null) li.dataset.score = String(hit.score);
  if (hit.start !== null) li.dataset.start = String(hit.start);

  const media = element("button", "media");
  media.type = "button";
  media.title = `Play ${hit.path}`;
  const img = document.createElement("img");
  img.alt = `frames of ${hit.path}`;
  img.className = "strip";
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
  if (hit.confidence !== null && hit.confidence !== undefined) {
    const conf = element("span", "confidence", `${Math.round(100 * hit.confidence)}% sure`);
    conf.title = "how sure the model is that this hit matches (0-100%)";
    meta.appendChild(conf);
  }
  if (hit.start !== null) {
    const end = hit.end === null ? "" : clock(hit.end);
    meta.appendChild(element("span", "segment", `${clock(hit.start)}\u2013${end}`));
  }
  caption.appendChild(meta);
  const bar = timeBar(hit);
  if (bar) caption.appendChild(bar);
  caption.appendChild(element("div", "path", hit.path));
  li.appendChild(media);
  li.appendChild(caption);
  return li;
}

async function search(text, top) {
  const mine = ++searchCount;
  stopPlaying();
  noMatch.hidden = true;
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
  noMatch.hidden = !body.no_good_match;
  results.classList.toggle("weak", Boolean(body.no_good_match));
  const n = body.count;
  setState(
    body.no_good_match ? "no-match" : "done",
    `${n} result${n === 1 ? "" : "s"} for \u201c${body.query}\u201d in ` +
      `${body.latency_ms.toFixed(1)} ms`,
  );
}

function describe(info) {
  document.getElementById("index-info").textContent =
    `${info.count} items indexed under ${info.root}`;
  notice.textContent = info.notice || "";
  notice.hidden = !info.notice;
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
