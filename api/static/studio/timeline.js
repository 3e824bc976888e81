// The timeline: a bar ruler, and per stem the plan's chords above its waveform on the bar grid,
// with the loop range and the playhead. Drawn on canvases sized to their CSS width.

const CHORD_STRIP = 18; // px above the waveform for the chord names

function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(100, Math.floor(canvas.clientWidth));
  const height = Math.floor(canvas.clientHeight || canvas.height);
  if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width, height };
}

/** The plan's bar grid: seconds per bar, the bars, one chord per bar. */
export function barGrid(plan) {
  const beats = parseInt(String(plan.time_signature || "4/4").split("/")[0], 10) || 4;
  const barSeconds = (beats * 60) / plan.bpm;
  return { beats, barSeconds, bars: plan.bars, chords: plan.chords || [] };
}

function drawLoopAndPlayhead(ctx, width, height, top, duration, state) {
  const x = (t) => (t / duration) * width;
  if (state.loop && state.loop.enabled) {
    ctx.fillStyle = "rgba(31, 79, 191, 0.15)";
    ctx.fillRect(x(state.loop.start), top, x(state.loop.end) - x(state.loop.start), height - top);
  }
  ctx.strokeStyle = "#b00020";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(x(state.playhead), 0);
  ctx.lineTo(x(state.playhead), height);
  ctx.stroke();
}

export function drawRuler(canvas, grid, duration, state) {
  const { ctx, width, height } = fit(canvas);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1b1d21";
  ctx.font = "12px system-ui, sans-serif";
  ctx.strokeStyle = "#4a505a";
  for (let bar = 0; bar < grid.bars; bar++) {
    const x = ((bar * grid.barSeconds) / duration) * width;
    ctx.beginPath(); ctx.moveTo(x + 0.5, height * 0.4); ctx.lineTo(x + 0.5, height); ctx.stroke();
    ctx.fillText(String(bar + 1), x + 3, 12);
  }
  drawLoopAndPlayhead(ctx, width, height, 0, duration, state);
}

export function drawTrack(canvas, wave, grid, duration, state) {
  const { ctx, width, height } = fit(canvas);
  ctx.clearRect(0, 0, width, height);
  const x = (t) => (t / duration) * width;
  // chords above the waveform, one per bar
  ctx.font = "bold 12px system-ui, sans-serif";
  ctx.fillStyle = "#1b1d21";
  for (let bar = 0; bar < grid.bars; bar++) {
    const chord = grid.chords[bar % Math.max(1, grid.chords.length)] || "";
    ctx.fillText(chord, x(bar * grid.barSeconds) + 4, 13);
  }
  // bar and beat grid
  for (let bar = 0; bar <= grid.bars; bar++) {
    for (let beat = 0; beat < grid.beats && !(bar === grid.bars && beat > 0); beat++) {
      const bx = Math.round(x((bar + beat / grid.beats) * grid.barSeconds)) + 0.5;
      ctx.strokeStyle = beat === 0 ? "#4a505a" : "#c9cdd3";
      ctx.beginPath(); ctx.moveTo(bx, beat === 0 ? 0 : CHORD_STRIP); ctx.lineTo(bx, height); ctx.stroke();
    }
  }
  // waveform: min/max per column
  const mid = CHORD_STRIP + (height - CHORD_STRIP) / 2;
  const half = (height - CHORD_STRIP) / 2 - 2;
  const columns = wave.length / 2;
  ctx.fillStyle = "#1f4fbf";
  for (let px = 0; px < width; px++) {
    const i = Math.min(columns - 1, Math.floor((px / width) * columns));
    const lo = wave[2 * i]; const hi = wave[2 * i + 1];
    ctx.fillRect(px, mid - hi * half, 1, Math.max(1, (hi - lo) * half));
  }
  drawLoopAndPlayhead(ctx, width, height, CHORD_STRIP, duration, state);
}
