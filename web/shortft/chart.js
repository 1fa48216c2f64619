// The live reward chart of a ShortFTTrain node, drawn on a 2D canvas: the training reward per iteration (raw and
// smoothed), held-out evaluations of the trained reward (mean +- std), the loss in a strip below, and the
// progressive stages as dashed lines. Pure functions of a run state; no ComfyUI import, so Node can test them.
//
// A run state is what the server keeps for a node (nodes/live.py) and the websocket events update:
// { run, method, reward_name, iterations, status, phase, points: [{iteration, reward, loss, stage, seconds}],
//   evals: [{iteration, seconds, <reward name>: mean, <reward name>_std: std, ...}] }.

export const COLORS = {
  reward: "rgba(74, 163, 255, 0.45)",
  smooth: "#4aa3ff",
  evals: "#ffb347",
  loss: "#e06c75",
  stage: "rgba(200, 200, 200, 0.55)",
  grid: "rgba(255, 255, 255, 0.08)",
  text: "#c8c8c8",
  faint: "#8a8a8a",
};

const EVAL_META = new Set(["iteration", "seconds"]);

/** The reward names measured in the evaluations, the trained one first when it is known. */
export function evalNames(state) {
  const names = [];
  for (const e of state.evals || []) {
    for (const key of Object.keys(e)) {
      if (!EVAL_META.has(key) && !key.endsWith("_std") && !names.includes(key)) names.push(key);
    }
  }
  const trained = state.reward_name;
  if (trained && names.includes(trained)) return [trained, ...names.filter((n) => n !== trained)];
  return names;
}

/** The eval key drawn on the reward axis: the trained reward's, else the first one measured. */
export function trainedEvalName(state) {
  return evalNames(state)[0] ?? null;
}

/** The trailing mean over `window` values (the smoothed reward line). */
export function movingAverage(values, window) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    sum += values[i];
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  }
  return out;
}

/** Iterations at which a new progressive stage begins, with the stage number: [{iteration, stage}]. */
export function stageStarts(points) {
  const out = [];
  let previous = null;
  for (const p of points) {
    if (p.stage == null) continue;
    if (previous !== null && p.stage !== previous) out.push({ iteration: p.iteration, stage: p.stage });
    previous = p.stage;
  }
  return out;
}

function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function range(values, pad = 0.06) {
  const xs = values.filter(finite);
  if (!xs.length) return [0, 1];
  let lo = Math.min(...xs);
  let hi = Math.max(...xs);
  if (hi - lo < 1e-9) {
    const d = Math.abs(hi) * 0.05 || 0.5;
    lo -= d;
    hi += d;
  }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

/** Everything the drawing needs, computed from a run state (also what the tests check). */
export function summarize(state) {
  const points = (state.points || []).filter((p) => finite(p.iteration));
  const rewards = points.map((p) => p.reward);
  const window = Math.max(1, Math.round(points.length / 15));
  const smooth = movingAverage(rewards.map((r) => (finite(r) ? r : 0)), window);
  const evalName = trainedEvalName(state);
  const evals = evalName
    ? (state.evals || [])
        .filter((e) => finite(e[evalName]))
        .map((e) => ({ iteration: e.iteration, mean: e[evalName], std: finite(e[evalName + "_std"]) ? e[evalName + "_std"] : 0 }))
    : [];
  const last = points.length ? points[points.length - 1] : null;
  const lastIteration = Math.max(last ? last.iteration : 0, ...evals.map((e) => e.iteration), 0);
  const xmax = Math.max(1, state.iterations || 0, lastIteration);
  const rewardRange = range([...rewards, ...evals.map((e) => e.mean - e.std), ...evals.map((e) => e.mean + e.std)]);
  const lossRange = range(points.map((p) => p.loss));
  const seconds = points.map((p) => p.seconds).filter(finite);
  const perIteration = seconds.length >= 2 ? (seconds[seconds.length - 1] - seconds[0]) / (seconds.length - 1) : null;
  return {
    points, rewards, smooth, evals, evalName, last, lastIteration, xmax, rewardRange, lossRange, perIteration,
    stages: stageStarts(points),
  };
}

function fmt(v) {
  if (!finite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1e4)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(3);
}

function line(ctx, xs, ys, color, width) {
  ctx.beginPath();
  let started = false;
  for (let i = 0; i < xs.length; i++) {
    if (!finite(ys[i])) continue;
    if (!started) ctx.moveTo(xs[i], ys[i]);
    else ctx.lineTo(xs[i], ys[i]);
    started = true;
  }
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.stroke();
}

function yTicks(ctx, [lo, hi], y0, y1, x, color) {
  ctx.fillStyle = color;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const f of [0, 0.5, 1]) {
    const v = lo + (hi - lo) * f;
    ctx.fillText(fmt(v), x, y1 - (y1 - y0) * f);
  }
}

/**
 * Draw the chart of `state` on `ctx` (already scaled to CSS pixels) in a width x height box. Returns the summary
 * it drew (points, evals, stages), so the caller can record what is on the canvas.
 */
export function drawChart(ctx, width, height, state, colors = COLORS) {
  const s = summarize(state);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  const left = 46, right = 8, top = 14, bottom = 16, gap = 14;
  const plotW = Math.max(10, width - left - right);
  const usable = Math.max(20, height - top - bottom - gap);
  const rewardH = Math.round(usable * 0.7);
  const lossTop = top + rewardH + gap;
  const lossH = usable - rewardH;
  const X = (it) => left + (plotW * it) / s.xmax;
  const Y = (v, [lo, hi], y0, h) => y0 + h - (h * (v - lo)) / (hi - lo);

  // frames and grid
  ctx.strokeStyle = colors.grid;
  ctx.lineWidth = 1;
  for (const [y0, h] of [[top, rewardH], [lossTop, lossH]]) {
    ctx.strokeRect(left + 0.5, y0 + 0.5, plotW, h);
    ctx.beginPath();
    ctx.moveTo(left, y0 + h / 2 + 0.5);
    ctx.lineTo(left + plotW, y0 + h / 2 + 0.5);
    ctx.stroke();
  }
  ctx.fillStyle = colors.faint;
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  ctx.fillText("reward" + (state.reward_name ? ` (${state.reward_name})` : ""), left + 4, top - 3);
  ctx.fillText("loss", left + 4, lossTop - 3);

  if (!s.points.length && !s.evals.length) {
    ctx.fillStyle = colors.faint;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("the reward chart appears here while ShortFTTrain runs", left + plotW / 2, top + rewardH / 2);
    return s;
  }

  // progressive stages
  ctx.save();
  ctx.setLineDash([4, 3]);
  ctx.strokeStyle = colors.stage;
  ctx.fillStyle = colors.text;
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  for (const st of s.stages) {
    const x = Math.round(X(st.iteration - 0.5)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, lossTop + lossH);
    ctx.stroke();
    ctx.fillText(`stage ${st.stage}`, x + 3, top + 2);
  }
  ctx.restore();

  // reward: raw, smoothed, held-out evaluations
  const xs = s.points.map((p) => X(p.iteration));
  line(ctx, xs, s.rewards.map((r) => Y(r, s.rewardRange, top, rewardH)), colors.reward, 1);
  line(ctx, xs, s.smooth.map((r) => Y(r, s.rewardRange, top, rewardH)), colors.smooth, 2);
  ctx.strokeStyle = colors.evals;
  ctx.fillStyle = colors.evals;
  ctx.lineWidth = 1.5;
  for (const e of s.evals) {
    const x = X(e.iteration);
    const y = Y(e.mean, s.rewardRange, top, rewardH);
    if (e.std > 0) {
      ctx.beginPath();
      ctx.moveTo(x, Y(e.mean - e.std, s.rewardRange, top, rewardH));
      ctx.lineTo(x, Y(e.mean + e.std, s.rewardRange, top, rewardH));
      ctx.stroke();
    }
    ctx.beginPath();
    ctx.arc(x, y, 3.5, 0, 2 * Math.PI);
    ctx.fill();
  }
  line(ctx, xs, s.points.map((p) => Y(p.loss, s.lossRange, lossTop, lossH)), colors.loss, 1.5);

  // axes
  ctx.font = "9px sans-serif";
  yTicks(ctx, s.rewardRange, top, top + rewardH, left - 4, colors.text);
  yTicks(ctx, s.lossRange, lossTop, lossTop + lossH, left - 4, colors.text);
  ctx.fillStyle = colors.text;
  ctx.textBaseline = "top";
  const yAxis = lossTop + lossH + 3;
  ctx.textAlign = "left";
  ctx.fillText("0", left, yAxis);
  ctx.textAlign = "right";
  ctx.fillText(`${s.xmax} it`, left + plotW, yAxis);
  return s;
}
