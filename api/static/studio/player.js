// Plays a job's stems together through the Web Audio API.
//
// Every stem's AudioBufferSourceNode is started with one and the same `when` (the context's clock,
// seconds) and the same offset, so the stems start on the same sample frame. Each stem goes through
// its own GainNode (its gain, times 0 when muted or when another stem is soloed) into the
// destination. A loop over bars sets loopStart/loopEnd on every source; changing the loop or the
// position restarts all sources together, again at one `when`.

const START_LATENCY = 0.1; // seconds between the click and the common start time

export class StemPlayer {
  constructor() {
    this.context = new AudioContext();
    this.tracks = []; // {stem, buffer, gainNode, gain, muted, soloed, source}
    this.playing = false;
    this.startedAt = 0;   // context time at which the current sources start
    this.startOffset = 0; // buffer offset they start from, seconds
    this.position = 0;    // where play starts next, seconds
    this.loop = { enabled: false, start: 0, end: 0 };
    this.lastStart = null; // {when, offset, sources: [{stem, when, offset}]} of the last start
  }

  get duration() {
    return this.tracks.reduce((longest, t) => Math.max(longest, t.buffer.duration), 0);
  }

  /** Decodes `bytes` (an ArrayBuffer of a WAV, FLAC or MP3 file) and adds it as a track. */
  async addTrack(stem, bytes) {
    const buffer = await this.context.decodeAudioData(bytes);
    const gainNode = this.context.createGain();
    gainNode.connect(this.context.destination);
    const track = { stem, buffer, gainNode, gain: 1, muted: false, soloed: false, source: null };
    this.tracks.push(track);
    this.applyGains();
    return track;
  }

  track(stem) {
    return this.tracks.find((t) => t.stem === stem);
  }

  clear() {
    this.stop();
    for (const t of this.tracks) t.gainNode.disconnect();
    this.tracks = [];
    this.position = 0;
  }

  /** Linear gain of a track after mute and solo. */
  effectiveGain(track) {
    const anySolo = this.tracks.some((t) => t.soloed);
    if (track.muted || (anySolo && !track.soloed)) return 0;
    return track.gain;
  }

  applyGains() {
    // The value setter takes effect now (and reads back at once, unlike a scheduled change).
    for (const t of this.tracks) t.gainNode.gain.value = this.effectiveGain(t);
  }

  setMuted(stem, muted) { this.track(stem).muted = muted; this.applyGains(); }
  setSoloed(stem, soloed) { this.track(stem).soloed = soloed; this.applyGains(); }
  setGain(stem, gain) { this.track(stem).gain = gain; this.applyGains(); }

  /** The playhead, seconds into the stems. */
  currentTime() {
    if (!this.playing) return this.position;
    const elapsed = Math.max(0, this.context.currentTime - this.startedAt);
    let t = this.startOffset + elapsed;
    const { enabled, start, end } = this.loop;
    if (enabled && end > start && t >= end) t = start + ((t - start) % (end - start));
    return Math.min(t, this.duration);
  }

  /** Starts every stem at one `when`, from `position` (or the loop's start, outside it). */
  async play() {
    if (this.context.state !== "running") await this.context.resume();
    this.stopSources();
    let offset = this.position >= this.duration ? 0 : this.position;
    const { enabled, start, end } = this.loop;
    if (enabled && (offset < start || offset >= end)) offset = start;
    const when = this.context.currentTime + START_LATENCY;
    const started = [];
    for (const t of this.tracks) {
      const source = this.context.createBufferSource();
      source.buffer = t.buffer;
      source.loop = enabled;
      if (enabled) { source.loopStart = start; source.loopEnd = end; }
      source.connect(t.gainNode);
      source.start(when, offset);
      t.source = source;
      started.push({ stem: t.stem, when, offset });
    }
    const first = this.tracks[0] && this.tracks[0].source;
    if (first) first.onended = () => { if (this.playing && first === this.tracks[0].source) this.ended(); };
    this.startedAt = when;
    this.startOffset = offset;
    this.playing = true;
    this.lastStart = { when, offset, sources: started };
  }

  ended() {
    this.playing = false;
    this.position = 0;
    for (const t of this.tracks) t.source = null;
  }

  stopSources() {
    for (const t of this.tracks) {
      if (t.source) {
        t.source.onended = null;
        try { t.source.stop(); } catch (_) { /* never started */ }
        t.source.disconnect();
        t.source = null;
      }
    }
  }

  /** Stops and keeps the playhead where it was. */
  pause() {
    this.position = this.currentTime();
    this.stopSources();
    this.playing = false;
  }

  stop() {
    this.stopSources();
    this.playing = false;
    this.position = 0;
  }

  /** Loops [start, end) seconds, or stops looping; a playing player restarts in step. */
  async setLoop(enabled, start, end) {
    this.loop = { enabled, start, end };
    if (this.playing) {
      this.position = this.currentTime();
      await this.play();
    }
  }

  async seek(seconds) {
    this.position = Math.max(0, Math.min(seconds, this.duration));
    if (this.playing) await this.play();
  }
}

/** Min/max pairs of the buffer's first channels' mix, `columns` of them (for the waveform). */
export function peaks(buffer, columns) {
  const channels = [];
  for (let c = 0; c < buffer.numberOfChannels; c++) channels.push(buffer.getChannelData(c));
  const length = buffer.length;
  const out = new Float32Array(columns * 2);
  const step = length / columns;
  for (let i = 0; i < columns; i++) {
    let lo = 0; let hi = 0;
    const from = Math.floor(i * step); const to = Math.min(length, Math.floor((i + 1) * step));
    for (let j = from; j < to; j++) {
      let v = 0;
      for (const data of channels) v += data[j];
      v /= channels.length;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    out[2 * i] = lo; out[2 * i + 1] = hi;
  }
  return out;
}
