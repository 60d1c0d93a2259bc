// uPlot time-series chart as a Preact component. Colours come from the CSS variables of the
// current theme (the chart is rebuilt on a theme switch); it follows its container's width.
// Drag across the plot to zoom in on a time range; `onZoom(true|false)` reports it.
import { html, useEffect, useRef } from "./lib.js";
import uPlot from "../vendor/uplot.mjs";

const PALETTE = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"];

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

/** data: [xs (seconds), ...ys]; series: [{ label }]; `keepZoom`: setData without rescaling. */
export function TimeChart({ data, series, height = 240, testid, attrs = {}, onZoom, resetRef, label, yLabel }) {
  const box = useRef(null);
  const plot = useRef(null);
  const zoomed = useRef(false);
  const seriesKey = series.map((s) => s.label).join("|");

  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const build = () => {
      if (plot.current) plot.current.destroy();
      const fg = cssVar("--muted");
      const grid = cssVar("--grid");
      const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
      const opts = {
        width: Math.max(200, el.clientWidth),
        height,
        cursor: { drag: { x: true, y: false } },
        legend: { show: true },
        scales: { x: { time: true } },
        axes: [axis, { ...axis, label: yLabel, size: 56 }],
        series: [
          {},
          ...series.map((s, i) => ({
            label: s.label,
            stroke: cssVar(PALETTE[i % PALETTE.length]),
            width: 2,
            spanGaps: true,
            points: { show: false },
          })),
        ],
        hooks: {
          setSelect: [
            (u) => {
              if (u.select.width > 0) {
                zoomed.current = true;
                onZoom && onZoom(true);
              }
            },
          ],
        },
      };
      plot.current = new uPlot(opts, data, el);
    };
    build();
    const ro = new ResizeObserver(() => {
      if (plot.current) plot.current.setSize({ width: Math.max(200, el.clientWidth), height });
    });
    ro.observe(el);
    const onTheme = () => build();
    window.addEventListener("mooring-theme", onTheme);
    const mq = matchMedia("(prefers-color-scheme: dark)");
    mq.addEventListener("change", onTheme);
    return () => {
      ro.disconnect();
      window.removeEventListener("mooring-theme", onTheme);
      mq.removeEventListener("change", onTheme);
      if (plot.current) plot.current.destroy();
      plot.current = null;
    };
  }, [seriesKey, height]);

  useEffect(() => {
    if (plot.current) plot.current.setData(data, !zoomed.current);
  }, [data]);

  if (resetRef) {
    resetRef.current = () => {
      zoomed.current = false;
      if (plot.current) plot.current.setData(data, true);
      onZoom && onZoom(false);
    };
  }

  return html`<div class="chart" data-testid=${testid} ref=${box} role="img" aria-label=${label} ...${attrs}></div>`;
}
