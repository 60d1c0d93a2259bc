// #/overview: the fleet at a glance: stat tiles, online devices and ingest over the last 24 h
// (GET /fleet/history), devices per firmware version (GET /fleet/summary). Refreshes every 30 s.
import { html, useMemo, useApi, useInterval, Async, ErrorBox, Loading, Empty, PageTitle, fmtNum, qs } from "../lib.js";
import { TimeChart } from "../chart.js";

const REFRESH_MS = 30_000;

function Stat({ label, value, testid, sub }) {
  return html`<div class="stat" data-testid=${testid}>
    <div class="stat-label">${label}</div>
    <div class="stat-value">${value}</div>
    ${sub && html`<div class="stat-sub">${sub}</div>`}
  </div>`;
}

function Versions({ summary }) {
  const rows = summary.versions || [];
  if (!summary.devices) return html`<div data-testid="versions-chart"><${Empty}>No devices yet. Register one with <code>mooring device create</code>.</${Empty}></div>`;
  const max = Math.max(1, ...rows.map((r) => r.devices));
  return html`<ul class="bars" data-testid="versions-chart" aria-label="Devices per firmware version">
    ${rows.map(
      (r) => html`<li key=${r.version ?? "-"}>
        ${r.version === null
          ? html`<span class="bar-label muted">no version reported</span>`
          : html`<a class="bar-label" href=${"#/devices?selector=" + encodeURIComponent("version=" + r.version)}>${r.version}</a>`}
        <span class="bar-track"><span class="bar-fill" style=${{ width: (100 * r.devices) / max + "%" }}></span></span>
        <span class="bar-num">${fmtNum(r.devices)}</span>
      </li>`,
    )}
    ${summary.versions_other > 0 && html`<li><span class="bar-label">other versions</span><span class="bar-track"></span><span class="bar-num">${fmtNum(summary.versions_other)}</span></li>`}
  </ul>`;
}

export default function Overview() {
  const summary = useApi("/fleet/summary");
  const history = useApi("/fleet/history");
  useInterval(() => {
    summary.reload();
    history.reload();
  }, REFRESH_MS);

  const h = history.data;
  const last = h && h.samples && h.samples.length ? h.samples[h.samples.length - 1] : null;
  const stepS = h ? (h.step_ms || 60000) / 1000 : 60;
  const ingest = last ? last.points / stepS : null;

  const series = useMemo(() => {
    if (!h || !h.samples) return null;
    const xs = h.samples.map((s) => s.ts_ms / 1000);
    return {
      online: [xs, h.samples.map((s) => s.online), h.samples.map((s) => s.devices)],
      ingest: [xs, h.samples.map((s) => s.points / stepS), h.samples.map((s) => s.messages / stepS)],
    };
  }, [h]);

  const s = summary.data;
  return html`
    <${PageTitle} sub="The whole fleet you can see, refreshed every 30 seconds.">Fleet overview</${PageTitle}>
    <section class="stats" aria-label="Fleet numbers">
      <${Stat} testid="stat-devices" label="Devices" value=${s ? fmtNum(s.devices) : summary.error ? "–" : "…"} />
      <${Stat} testid="stat-online" label="Online" value=${s ? fmtNum(s.online) : summary.error ? "–" : "…"}
        sub=${s && s.devices ? Math.round((100 * s.online) / s.devices) + "% of the fleet" : null} />
      <${Stat} testid="stat-ingest" label="Ingest" value=${ingest === null ? (history.error || h ? "–" : "…") : fmtNum(Math.round(ingest * 10) / 10) + " points/s"}
        sub=${last ? "last minute" : history.error ? "unavailable" : h ? "no samples yet" : null} />
    </section>
    ${history.error && history.error.code !== "fleet_wide" && html`<${ErrorBox} error=${history.error} retry=${history.reload} />`}
    ${history.error && history.error.code === "fleet_wide" && html`<p class="hint">Your account is limited to part of the fleet, so the fleet-wide history and ingest rate are not shown.</p>`}
    ${!(history.error && history.error.code === "fleet_wide") && html`<div class="grid2">
      <section class="card">
        <h2>Online devices, last 24 h</h2>
        ${history.loading && !h ? html`<${Loading} />` : series && h.samples.length
          ? html`<${TimeChart} testid="online-chart" label="Online and registered devices over the last 24 hours" data=${series.online} series=${[{ label: "online" }, { label: "devices" }]} height=${220} />`
          : !history.error && html`<div data-testid="online-chart"><${Empty}>No samples yet: the server records one a minute.</${Empty}></div>`}
      </section>
      <section class="card">
        <h2>Ingest rate, last 24 h</h2>
        ${history.loading && !h ? html`<${Loading} />` : series && h.samples.length
          ? html`<${TimeChart} testid="ingest-chart" label="Telemetry points and MQTT messages per second" data=${series.ingest} series=${[{ label: "points/s" }, { label: "messages/s" }]} height=${220} />`
          : !history.error && html`<${Empty}>No samples yet.</${Empty}>`}
      </section>
    </div>`}
    <section class="card">
      <h2>Devices per firmware version</h2>
      <${Async} res=${summary}>${(d) => html`<${Versions} summary=${d} />`}</${Async}>
    </section>
  `;
}
