// #/tokens (admins): API tokens for apps and machines: create (the secret is shown once), revoke.
import { html, useState, api, useApi, can, toast, Empty, Async, Dialog, Confirm, PageTitle, fmtTime, fmtAgo } from "../lib.js";

const ROLES = ["viewer", "operator", "installer", "service", "admin"];
const EXPIRY = [
  { label: "never", ms: null },
  { label: "30 days", ms: 30 * 86_400_000 },
  { label: "90 days", ms: 90 * 86_400_000 },
  { label: "1 year", ms: 365 * 86_400_000 },
];
const enc = encodeURIComponent;

function CreateToken({ onCreated, onClose }) {
  const [name, setName] = useState("");
  const [role, setRole] = useState("viewer");
  const [scope, setScope] = useState("");
  const [expiry, setExpiry] = useState("never");
  const [error, setError] = useState(null);
  const [created, setCreated] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    try {
      const ms = EXPIRY.find((x) => x.label === expiry).ms;
      const t = await api("POST", "/tokens", { name: name.trim(), role, scope: scope.trim() || null, expires_in_ms: ms ?? undefined });
      setCreated(t);
      onCreated();
    } catch (err) {
      setError(err.message);
    }
  };
  if (created) {
    return html`<${Dialog} title="Token created" onClose=${onClose} testid="token-dialog">
      <p>Copy the secret now: it is shown only this once.</p>
      <p class="secret mono" data-testid="token-secret">${created.token}</p>
      <p class="hint">Use it as <code>Authorization: Bearer …</code>.</p>
      <div class="actions"><button type="button" class="btn primary" onClick=${onClose}>Done</button></div>
    </${Dialog}>`;
  }
  return html`<${Dialog} title="New API token" onClose=${onClose} testid="token-dialog">
    <form onSubmit=${submit}>
      <label>Name<input required data-testid="token-name" value=${name} onInput=${(e) => setName(e.target.value)} autofocus placeholder="grafana" /></label>
      <label>Role<select data-testid="token-role" value=${role} onChange=${(e) => setRole(e.target.value)}>${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}</select></label>
      <label>Scope (optional)<input class="mono" data-testid="token-scope" placeholder="tag:customer=acme" value=${scope} onInput=${(e) => setScope(e.target.value)} disabled=${role === "admin"} /></label>
      <label>Expires<select value=${expiry} onChange=${(e) => setExpiry(e.target.value)}>${EXPIRY.map((x) => html`<option value=${x.label}>${x.label}</option>`)}</select></label>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="token-submit">Create token</button></div>
    </form>
  </${Dialog}>`;
}

export default function Tokens() {
  const res = useApi("/tokens?limit=500");
  const [creating, setCreating] = useState(false);
  const [revoking, setRevoking] = useState(null);
  if (!can("tokens.manage")) return null;
  const revoke = async (t) => {
    try {
      await api("DELETE", `/tokens/${enc(t.id)}`);
      toast(`Token ${t.name} revoked`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setRevoking(null);
  };
  return html`
    <${PageTitle} sub="Bearer tokens for scripts, apps and machines.">API tokens</${PageTitle}>
    <div class="toolbar"><span class="spacer"></span><button type="button" class="btn primary" data-testid="token-create" onClick=${() => setCreating(true)}>New token</button></div>
    <${Async} res=${res}>${(d) => d.tokens.length === 0 ? html`<${Empty}>No tokens.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Name</th><th>Role</th><th>Scope</th><th>Created</th><th>Expires</th><th>Last used</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.tokens.map((t) => html`<tr key=${t.id} data-testid="token-row" data-token-id=${t.id} data-name=${t.name}>
        <td data-label="Name"><strong>${t.name}</strong> <code class="muted">${t.id}</code></td>
        <td data-label="Role"><span class="badge">${t.role}</span></td>
        <td data-label="Scope">${t.scope ? html`<code>${t.scope}</code>` : html`<span class="muted">whole fleet</span>`}</td>
        <td data-label="Created">${fmtTime(t.created_at)}</td>
        <td data-label="Expires">${t.expires_at ? fmtTime(t.expires_at) : "never"}</td>
        <td data-label="Last used">${fmtAgo(t.last_used_at)}</td>
        <td class="row-actions"><button type="button" class="btn small danger" data-testid="token-revoke" onClick=${() => setRevoking(t)}>Revoke</button></td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${creating && html`<${CreateToken} onClose=${() => setCreating(false)} onCreated=${() => res.reload()} />`}
    ${revoking && html`<${Confirm} title="Revoke token" text=${`Revoke ${revoking.name}? Anything using it is refused from now on.`} okLabel="Revoke" danger onOk=${() => revoke(revoking)} onCancel=${() => setRevoking(null)} />`}
  `;
}
