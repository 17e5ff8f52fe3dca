// Live gallery of sampled HashtagResult records, and the status strip of the pipeline.
//
// Every string that comes from a tweet or a model reaches the DOM through textContent
// or a plain property (img.alt, title), never innerHTML: tweet text is attacker-chosen.
"use strict";

(() => {
  const POLL_MS = 2000;
  const MAX_CARDS = 200;

  const grid = document.getElementById("grid");
  const empty = document.getElementById("empty");
  const statusEl = document.getElementById("status");
  const template = document.getElementById("card-template");
  const stat = {
    seen: document.getElementById("stat-seen"),
    sampled: document.getElementById("stat-sampled"),
    shown: document.getElementById("stat-shown"),
  };

  const strip = {
    tweetsIn: document.getElementById("status-in"),
    resultsOut: document.getElementById("status-out"),
    shed: document.getElementById("status-shed"),
    dead: document.getElementById("status-dead"),
    p50: document.getElementById("status-p50"),
    p99: document.getElementById("status-p99"),
    lag: document.getElementById("status-lag"),
    source: document.getElementById("status-source"),
  };
  // One id per page load: the sink counts the pages polling it (tagstream_sink_gallery_clients).
  const clientId =
    window.crypto && crypto.randomUUID
      ? crypto.randomUUID()
      : Math.random().toString(36).slice(2) + Date.now().toString(36);

  let lastSeq = 0;

  const fmtInt = (n) => (Number.isFinite(n) ? n.toLocaleString("en-US") : "–");

  function fmtLatency(ms) {
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    return `${(ms / 60000).toFixed(1)} min`;
  }

  const num = (x) => typeof x === "number" && Number.isFinite(x);
  const fmtRate = (x) => (num(x) ? `${x < 10 ? x.toFixed(1) : Math.round(x)}/s` : "–");
  const fmtShare = (x) => (num(x) ? `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%` : "–");
  const fmtSeconds = (x) => (num(x) ? fmtLatency(x * 1000) : "–");

  function renderStatus(s) {
    strip.tweetsIn.textContent = fmtRate(s.tweets_in_per_s);
    strip.resultsOut.textContent = fmtRate(s.results_per_s);
    strip.shed.textContent = fmtShare(s.shed_fraction);
    strip.dead.textContent = fmtRate(s.dead_letters_per_s);
    strip.p50.textContent = fmtSeconds(s.latency_p50_s);
    strip.p99.textContent = fmtSeconds(s.latency_p99_s);
    const groups = Object.entries(s.lag || {});
    strip.lag.textContent = groups.length
      ? groups.map(([group, n]) => `${group} ${fmtInt(n)}`).join(" · ")
      : "–";
    strip.source.textContent =
      s.source === "prometheus" ? "from Prometheus" : "from the sink's own view";
    strip.source.title = s.note || "";
  }

  function buildCard(s) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.seq = String(s.seq);

    const img = card.querySelector(".thumb");
    if (s.thumb) {
      // thumb is a server-made [A-Za-z0-9_-].jpg name; encode anyway.
      img.src = `thumbs/${encodeURIComponent(s.thumb)}`;
      img.alt = String(s.top_class ?? "");
      img.addEventListener("error", () => card.classList.add("no-image"));
    } else {
      card.classList.add("no-image");
      img.remove();
    }

    const scores = s.scores || {};
    const top = scores[s.top_class];
    const score = card.querySelector(".score");
    if (typeof top === "number") {
      score.textContent = `${s.top_class} · ${(top * 100).toFixed(1)}%`;
    } else {
      score.textContent = String(s.top_class ?? "");
    }

    const tags = card.querySelector(".tags");
    for (const tag of s.hashtags || []) {
      const li = document.createElement("li");
      li.className = "tag";
      li.textContent = `#${String(tag).replace(/^#+/, "")}`;
      tags.appendChild(li);
    }

    const text = card.querySelector(".text");
    text.textContent = s.tweet_text || "";
    if (!s.tweet_text) text.classList.add("blank");

    const model = card.querySelector(".model");
    model.textContent = `${s.model_id ?? "?"} v${s.model_version ?? "?"}`;

    const ts = s.timestamps || {};
    const latency = card.querySelector(".latency");
    if (typeof ts.produced === "number" && typeof ts.ingested === "number") {
      latency.textContent = `e2e ${fmtLatency(ts.produced - ts.ingested)}`;
      latency.title = "end to end: produced − ingested";
    } else {
      latency.remove();
    }
    card.title = `tweet ${s.tweet_id ?? ""} · media ${s.media_key ?? ""}`;
    return card;
  }

  function render(data) {
    // A sink that lost its samples.jsonl restarts numbering: start over.
    if (data.last_seq < lastSeq) {
      grid.replaceChildren();
      lastSeq = 0;
      return false;
    }
    // samples come newest first: insert oldest first so the newest ends up on top.
    const samples = data.samples || [];
    for (let i = samples.length - 1; i >= 0; i--) {
      grid.insertBefore(buildCard(samples[i]), grid.firstChild);
    }
    while (grid.childElementCount > MAX_CARDS) grid.lastElementChild.remove();
    if (samples.length) lastSeq = Math.max(lastSeq, samples[0].seq);

    const stats = data.stats || {};
    stat.seen.textContent = fmtInt(stats.seen);
    stat.sampled.textContent = fmtInt(stats.sampled);
    stat.shown.textContent = fmtInt(grid.childElementCount);
    empty.hidden = grid.childElementCount > 0;
    return true;
  }

  function setStatus(state, label) {
    statusEl.dataset.state = state;
    statusEl.textContent = label;
  }

  async function poll() {
    try {
      const resp = await fetch(`api/samples?after=${lastSeq}&client=${clientId}`, {
        cache: "no-store",
      });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      if (!render(await resp.json())) return poll();
      setStatus("live", "live");
      const status = await fetch("api/status", { cache: "no-store" });
      if (status.ok) renderStatus(await status.json());
    } catch (err) {
      setStatus("offline", "reconnecting…");
    }
  }

  async function loop() {
    await poll();
    setTimeout(loop, POLL_MS);
  }

  loop();
})();
