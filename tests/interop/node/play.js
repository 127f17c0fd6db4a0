// Plays a Kinesis Video Streams session URL inside Debian's chromium (driven by playwright-core,
// no downloaded browser): an HLS session URL in hls.js ("player": "hls", the default), a DASH
// manifest URL in dash.js ("player": "dash"), or Mooring's own player page ("player": "page",
// "url" the page's address, e.g. /console/video/{stream}?hls_js=/__browser_test__/hls.min.js:
// the page runs its own hls.js with its own settings and is only watched). Prints one JSON report on stdout: whether playback
// started, the player's errors, dropped frames over the measuring window, and for every
// presented frame the wall clock it was shown at with the frame number read back from the
// blocks burned into it. The page makes no request outside Mooring's origin: any other is
// aborted and listed in the report's "blocked" (dash.js's default clock source is on the
// internet; it then falls back to the manifest response's Date header).
//
// usage: node play.js '{"url": "...", "player": "hls", "lowLatency": false, "seconds": 10,
//                      "startTimeout": 40, "windows": 2, "hlsConfig": {...extra hls.js settings},
//                      "dashConfig": {...dash.js settings, for player.updateSettings},
//                      "chromium": "/usr/bin/chromium", "bits": 16, "block": 16,
//                      "consoleFile": "path to keep the page's console in"}'
'use strict';
const path = require('path');
const { chromium } = require('playwright-core');

const options = JSON.parse(process.argv[2]);
const PLAYER_NAME = options.player || 'hls';
// The player's script, served as a file of this name.
const SCRIPTS = {
  hls: path.join(path.dirname(require.resolve('hls.js')), 'hls.min.js'),
  // dashjs's main export is its UMD build, dist/modern/umd/dash.all.min.js.
  dash: require.resolve('dashjs'),
};
// Mooring's player page loads hls.js from where its hls_js parameter says.
SCRIPTS.page = SCRIPTS.hls;
if (!SCRIPTS[PLAYER_NAME]) throw new Error(`unknown player ${PLAYER_NAME}`);
const SCRIPT = path.basename(SCRIPTS[PLAYER_NAME]);
// The page is served (by page.route, never reaching the server) from a path on Mooring's own
// origin: a loopback server may not be fetched from a public origin (Private Network Access).
const ORIGIN = new URL(options.url).origin;
const PLAYER = `${ORIGIN}/__browser_test__`;

const PAGE = `<!doctype html><html><body>
<video id="v" muted playsinline width="320" height="240"></video>
<canvas id="c" width="320" height="240"></canvas>
<script src="${PLAYER}/${SCRIPT}"></script>
</body></html>`;

// Runs in the page: attach the player (or, on Mooring's player page, find the page's own) and
// record every presented frame.
function startPlayer({ player, url, lowLatency, bits, block, hlsConfig, dashConfig }) {
  const video = document.getElementById('v') || document.querySelector('video');
  let canvas = document.getElementById('c');
  if (!canvas) {
    canvas = document.createElement('canvas');
    canvas.width = 320;
    canvas.height = 240;
    document.body.appendChild(canvas);
  }
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const state = { errors: [], frames: [], delays: [], fragments: 0, parts: 0, events: [] };
  window.report = state;
  // Seeks, rate changes and stalls, each with the dropped-frame count at that moment: what the
  // player did around a dropped frame.
  for (const type of ['seeking', 'ratechange', 'waiting']) {
    video.addEventListener(type, () => state.events.push({
      type, at: Date.now(), currentTime: video.currentTime, rate: video.playbackRate,
      dropped: video.getVideoPlaybackQuality().droppedVideoFrames }));
  }
  let playingDate = () => null;
  if (player === 'page') {
    // The page's hls.js (window.hls) and the errors it has seen (window.playerErrors).
    const hls = window.hls;
    window.version = `hls.js ${Hls.version}, Mooring's player page`;
    state.errors = window.playerErrors || [];
    hls.on(Hls.Events.FRAG_LOADED, (_, d) => {
      if (d.part) state.parts += 1; else state.fragments += 1;
    });
    window.latency = () => ({ latency: hls.latency, targetLatency: hls.targetLatency });
    playingDate = () => hls.playingDate;
  } else if (player === 'dash') {
    const dash = dashjs.MediaPlayer().create();
    window.player = dash;
    window.version = `dash.js ${dashjs.Version}`;
    const events = dashjs.MediaPlayer.events;
    dash.updateSettings(dashConfig);
    // dash.js has no fatal flag: any ERROR (manifest, segment, MSE, clock sync ...) or
    // PLAYBACK_ERROR (the video element's) counts as fatal.
    const onError = (type) => (e) => {
      const err = (e && e.error) || {};
      state.errors.push({ type, details: String(err.code !== undefined ? err.code : err), fatal: true,
        reason: String(err.message || ''), data: JSON.stringify(err.data || null).slice(0, 500) });
    };
    dash.on(events.ERROR, onError('error'));
    dash.on(events.PLAYBACK_ERROR, onError('playback'));
    dash.on(events.PLAYBACK_NOT_ALLOWED,
      () => state.errors.push({ type: 'play', details: 'playbackNotAllowed', fatal: false }));
    dash.on(events.FRAGMENT_LOADING_COMPLETED, (e) => {
      if (e.request && e.request.type === 'MediaSegment') state.fragments += 1;
    });
    window.latency = () => ({
      latency: dash.isDynamic() ? dash.getCurrentLiveLatency() : null,
      targetLatency: dash.isDynamic() ? dash.getTargetLiveDelay() : null,
    });
    dash.initialize(video, url, true);
  } else {
    const hls = new Hls({ lowLatencyMode: lowLatency, debug: false, ...hlsConfig });
    window.player = hls;
    window.version = `hls.js ${Hls.version}`;
    hls.on(Hls.Events.ERROR, (_, d) => {
      state.errors.push({ type: d.type, details: d.details, fatal: d.fatal,
        reason: String(d.reason || (d.error && d.error.message) || '') });
    });
    hls.on(Hls.Events.FRAG_LOADED, (_, d) => {
      if (d.part) state.parts += 1; else state.fragments += 1;
    });
    window.latency = () => ({ latency: hls.latency, targetLatency: hls.targetLatency });
    playingDate = () => hls.playingDate;
    hls.loadSource(url);
    hls.attachMedia(video);
    video.play().catch((e) => state.errors.push({ type: 'play', details: String(e), fatal: false }));
  }
  const onFrame = (now, meta) => {
    ctx.drawImage(video, 0, 0, canvas.width, canvas.height);
    const row = ctx.getImageData(0, block / 2, bits * block, 1).data;
    let n = 0;
    for (let k = 0; k < bits; k++) {
      const x = k * block + block / 2;
      if (row[x * 4] > 128) n |= 1 << k;
    }
    const shown = performance.timeOrigin + (meta.expectedDisplayTime || now);
    state.frames.push([shown, n]);
    const date = playingDate();
    if (date) state.delays.push(Date.now() - date.getTime());
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function snapshot() {
  const v = document.getElementById('v') || document.querySelector('video');
  const q = v.getVideoPlaybackQuality();
  return {
    currentTime: v.currentTime,
    readyState: v.readyState,
    paused: v.paused,
    dropped: q.droppedVideoFrames,
    total: q.totalVideoFrames,
    fatal: window.report.errors.filter((e) => e.fatal).length,
    buffered: Array.from({ length: v.buffered.length }, (_, i) => [v.buffered.start(i), v.buffered.end(i)]),
  };
}

(async () => {
  const browser = await chromium.launch({
    executablePath: options.chromium || '/usr/bin/chromium',
    args: ['--no-sandbox', '--autoplay-policy=no-user-gesture-required', '--disable-gpu',
      '--disable-dev-shm-usage'],
  });
  const out = { started: false, player: PLAYER_NAME, blocked: [] };
  try {
    const page = await browser.newPage();
    const console_lines = [];
    page.on('console', (m) => console_lines.push(m.text()));
    page.on('pageerror', (e) => console_lines.push('pageerror: ' + e.message));
    await page.route((u) => u.origin !== ORIGIN, (route) => {
      out.blocked.push(route.request().url());
      return route.abort('blockedbyclient');
    });
    await page.route(`${PLAYER}/**`, (route) => {
      const u = new URL(route.request().url());
      if (u.pathname.endsWith(`/${SCRIPT}`)) {
        return route.fulfill({ path: SCRIPTS[PLAYER_NAME], contentType: 'application/javascript' });
      }
      return route.fulfill({ body: PAGE, contentType: 'text/html' });
    });
    await page.goto(PLAYER_NAME === 'page' ? options.url : `${PLAYER}/index.html`);
    out.mse_h264 = await page.evaluate(
      () => MediaSource.isTypeSupported('video/mp4; codecs="avc1.42c01e"'));
    await page.evaluate(startPlayer, {
      player: PLAYER_NAME, url: options.url, lowLatency: !!options.lowLatency,
      bits: options.bits || 16, block: options.block || 16,
      hlsConfig: options.hlsConfig || {}, dashConfig: options.dashConfig || {},
    });
    out.version = await page.evaluate(() => window.version);
    // Playback has started once currentTime advances with enough data buffered.
    const deadline = Date.now() + (options.startTimeout || 40) * 1000;
    let first = await page.evaluate(snapshot);
    while (Date.now() < deadline) {
      await page.waitForTimeout(250);
      const s = await page.evaluate(snapshot);
      if (s.fatal) break;
      if (s.readyState >= 3 && s.currentTime > first.currentTime && !s.paused) {
        out.started = true;
        break;
      }
      first = s.currentTime > 0 ? first : s;
    }
    // The measuring window. A frame the browser drops now and then on a busy machine (its
    // decoder or compositor missing a deadline) does not recur; one the stream causes (a gap,
    // a seek) recurs every fragment. So a window with a dropped frame is kept in "windows" and
    // one more window is measured: out.before/out.after are the last window's.
    out.start_wall = Date.now();
    out.windows = [];
    let before = await page.evaluate(snapshot);
    let after = before;
    for (let w = 0; w < (options.windows || 2) && out.started; w++) {
      await page.waitForTimeout((options.seconds || 10) * 1000);
      after = await page.evaluate(snapshot);
      out.windows.push({ before, after });
      if (after.dropped === before.dropped) break;
      before = after;
    }
    out.before = before;
    out.after = after;
    out.report = await page.evaluate(() => ({
      errors: window.report.errors,
      frames: window.report.frames,
      delays: window.report.delays,
      fragments: window.report.fragments,
      parts: window.report.parts,
      events: window.report.events,
      ...window.latency(),
    }));
    out.console = console_lines.slice(-20);
    if (options.consoleFile) require('fs').writeFileSync(options.consoleFile, console_lines.join('\n'));
  } catch (e) {
    out.exception = String(e && e.stack || e);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out));
})();
