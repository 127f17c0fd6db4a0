// Plays an HLS session URL in hls.js inside Debian's chromium (driven by playwright-core, no
// downloaded browser) and prints one JSON report on stdout: whether playback started, hls.js
// errors, dropped frames over the measuring window, and for every presented frame the wall
// clock it was shown at with the frame number read back from the blocks burned into it.
//
// usage: node play.js '{"url": "...", "lowLatency": false, "seconds": 10, "startTimeout": 40,
//                      "hlsConfig": {...extra hls.js settings}}'
'use strict';
const path = require('path');
const { chromium } = require('playwright-core');

const options = JSON.parse(process.argv[2]);
const HLS_JS = path.join(path.dirname(require.resolve('hls.js')), 'hls.min.js');
// The page is served (by page.route, never reaching the server) from a path on Mooring's own
// origin: a loopback server may not be fetched from a public origin (Private Network Access).
const ORIGIN = new URL(options.url).origin;
const PLAYER = `${ORIGIN}/__browser_test__`;

const PAGE = `<!doctype html><html><body>
<video id="v" muted playsinline width="320" height="240"></video>
<canvas id="c" width="320" height="240"></canvas>
<script src="${PLAYER}/hls.min.js"></script>
</body></html>`;

// Runs in the page: attach hls.js and record every presented frame.
function startPlayer({ url, lowLatency, bits, block, hlsConfig }) {
  const video = document.getElementById('v');
  const canvas = document.getElementById('c');
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const state = { errors: [], frames: [], delays: [], fragments: 0, parts: 0 };
  window.report = state;
  const hls = new Hls({ lowLatencyMode: lowLatency, debug: false, ...hlsConfig });
  window.hls = hls;
  hls.on(Hls.Events.ERROR, (_, d) => {
    state.errors.push({ type: d.type, details: d.details, fatal: d.fatal,
      reason: String(d.reason || (d.error && d.error.message) || '') });
  });
  hls.on(Hls.Events.FRAG_LOADED, (_, d) => {
    if (d.part) state.parts += 1; else state.fragments += 1;
  });
  hls.loadSource(url);
  hls.attachMedia(video);
  video.play().catch((e) => state.errors.push({ type: 'play', details: String(e), fatal: false }));
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
    if (hls.playingDate) state.delays.push(Date.now() - hls.playingDate.getTime());
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function snapshot() {
  const v = document.getElementById('v');
  const q = v.getVideoPlaybackQuality();
  return {
    currentTime: v.currentTime,
    readyState: v.readyState,
    paused: v.paused,
    dropped: q.droppedVideoFrames,
    total: q.totalVideoFrames,
    fatal: window.report.errors.filter((e) => e.fatal).length,
  };
}

(async () => {
  const browser = await chromium.launch({
    executablePath: options.chromium || '/usr/bin/chromium',
    args: ['--no-sandbox', '--autoplay-policy=no-user-gesture-required', '--disable-gpu',
      '--disable-dev-shm-usage'],
  });
  const out = { started: false };
  try {
    const page = await browser.newPage();
    const console_lines = [];
    page.on('console', (m) => console_lines.push(m.text()));
    page.on('pageerror', (e) => console_lines.push('pageerror: ' + e.message));
    await page.route(`${PLAYER}/**`, (route) => {
      const u = new URL(route.request().url());
      if (u.pathname.endsWith('/hls.min.js')) {
        return route.fulfill({ path: HLS_JS, contentType: 'application/javascript' });
      }
      return route.fulfill({ body: PAGE, contentType: 'text/html' });
    });
    await page.goto(`${PLAYER}/index.html`);
    out.mse_h264 = await page.evaluate(
      () => MediaSource.isTypeSupported('video/mp4; codecs="avc1.42c01e"'));
    out.hls_version = await page.evaluate(() => Hls.version);
    await page.evaluate(startPlayer, {
      url: options.url, lowLatency: !!options.lowLatency, bits: options.bits || 16,
      block: options.block || 16, hlsConfig: options.hlsConfig || {},
    });
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
    out.start_wall = Date.now();
    const before = await page.evaluate(snapshot);
    if (out.started) await page.waitForTimeout((options.seconds || 10) * 1000);
    const after = await page.evaluate(snapshot);
    out.before = before;
    out.after = after;
    out.report = await page.evaluate(() => ({
      errors: window.report.errors,
      frames: window.report.frames,
      delays: window.report.delays,
      fragments: window.report.fragments,
      parts: window.report.parts,
      latency: window.hls.latency,
      targetLatency: window.hls.targetLatency,
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
