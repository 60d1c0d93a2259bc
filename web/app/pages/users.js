// #/users (admins): people who sign in: create with a role and scope (a one-time password link
// is shown), new password link, disable/enable, delete.
import { html, useState, api, useApi, can, toast, Empty, Async, Dialog, Confirm, PageTitle, fmtTime, session } from "../lib.js";

export const ROLES = ["admin", "operator", "installer", "viewer"];
const enc = encodeURIComponent;

function LinkBox({ link, onClose }) {
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(link);
      toast("Link copied");
    } catch (_) {
      toast("Copy it by hand: the browser refused the clipboard", "error");
    }
  };
  return html`<${Dialog} title="Password link" onClose=${onClose} testid="password-link-dialog">
    <p>Give this link to the person; it works once and expires. It is not shown again.</p>
    <p class="secret mono" data-testid="password-link">${link}</p>
    <div class="actions"><button type="button" class="btn" onClick=${copy}>Copy</button><button type="button" class="btn primary" onClick=${onClose}>Done</button></div>
  </${Dialog}>`;
}

function CreateUser({ onCreated, onClose }) {
  const [email, setEmail] = useState("");
  const [role, setRole] = useState("viewer");
  const [scope, setScope] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const r = await api("POST", "/users", { email: email.trim(), role, scope: scope.trim() || null });
      onCreated(r);
    } catch (err) {
      setError(err.message);
      setBusy(false);
    }
  };
  return html`<${Dialog} title="New user" onClose=${onClose} testid="user-dialog">
    <form onSubmit=${submit}>
      <label>Email<input type="email" required data-testid="user-email" value=${email} onInput=${(e) => setEmail(e.target.value)} autofocus /></label>
      <label>Role<select data-testid="user-role" value=${role} onChange=${(e) => setRole(e.target.value)}>${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}</select></label>
      <label>Scope (optional selector of tag: and id: terms)<input data-testid="user-scope" class="mono" placeholder="tag:customer=acme" value=${scope} onInput=${(e) => setScope(e.target.value)} disabled=${role === "admin"} /></label>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="user-submit" disabled=${busy}>Create user</button></div>
    </form>
  </${Dialog}>`;
}

function EditUser({ user, onSaved, onClose }) {
  const [role, setRole] = useState(user.role);
  const [scope, setScope] = useState(user.scope || "");
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    try {
      await api("PATCH", `/users/${enc(user.id)}`, { role, scope: role === "admin" ? null : scope.trim() || null });
      onSaved();
    } catch (err) {
      setError(err.message);
    }
  };
  return html`<${Dialog} title=${"Edit " + user.email} onClose=${onClose} testid="user-edit-dialog">
    <form onSubmit=${submit}>
      <label>Role<select data-testid="user-edit-role" value=${role} onChange=${(e) => setRole(e.target.value)}>${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}</select></label>
      <label>Scope (empty: the whole fleet)<input class="mono" data-testid="user-edit-scope" value=${scope} onInput=${(e) => setScope(e.target.value)} disabled=${role === "admin"} /></label>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="user-edit-save">Save</button></div>
    </form>
  </${Dialog}>`;
}

export default function Users() {
  const res = useApi("/users?limit=500");
  const [creating, setCreating] = useState(false);
  const [link, setLink] = useState(null);
  const [deleting, setDeleting] = useState(null);
  const [editing, setEditing] = useState(null);
  if (!can("users.manage")) return null;
  const act = async (fn, msg) => {
    try {
      await fn();
      if (msg) toast(msg);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
  };
  const newLink = (u) => act(async () => setLink((await api("POST", `/users/${enc(u.id)}/password-link`)).password_link));
  const setDisabled = (u, disabled) => act(() => api("PATCH", `/users/${enc(u.id)}`, { disabled }), `${u.email} ${disabled ? "disabled" : "enabled"}`);
  const del = (u) => act(async () => { await api("DELETE", `/users/${enc(u.id)}`); setDeleting(null); }, `${u.email} deleted`);
  return html`
    <${PageTitle} sub="People who sign in to this dashboard and the API.">Users</${PageTitle}>
    <div class="toolbar"><span class="spacer"></span><button type="button" class="btn primary" data-testid="user-create" onClick=${() => setCreating(true)}>New user</button></div>
    <${Async} res=${res}>${(d) => d.users.length === 0 ? html`<${Empty}>No users yet.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Email</th><th>Role</th><th>Scope</th><th>Status</th><th>Created</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.users.map((u) => html`<tr key=${u.id} data-testid="user-row" data-email=${u.email}>
        <td data-label="Email">${u.email}</td>
        <td data-label="Role"><span class="badge">${u.role}</span></td>
        <td data-label="Scope">${u.scope ? html`<code>${u.scope}</code>` : html`<span class="muted">whole fleet</span>`}</td>
        <td data-label="Status">${u.disabled ? html`<span class="badge off">disabled</span>` : u.has_password || u.oidc ? html`<span class="badge on">active</span>` : html`<span class="badge">no password yet</span>`}</td>
        <td data-label="Created">${fmtTime(u.created_at)}</td>
        <td class="row-actions">
          ${!u.oidc && html`<button type="button" class="btn small" data-testid="user-password-link" onClick=${() => newLink(u)}>Password link</button>`}
          ${session.me && session.me.id !== u.id && html`
            <button type="button" class="btn small" data-testid="user-edit" onClick=${() => setEditing(u)}>Edit</button>
            <button type="button" class="btn small" data-testid="user-toggle" onClick=${() => setDisabled(u, !u.disabled)}>${u.disabled ? "Enable" : "Disable"}</button>
            <button type="button" class="btn small danger" data-testid="user-delete" onClick=${() => setDeleting(u)}>Delete</button>`}
        </td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${creating && html`<${CreateUser} onClose=${() => setCreating(false)} onCreated=${(r) => { setCreating(false); res.reload(); toast(`${r.user.email} created`); if (r.password_link) setLink(r.password_link); }} />`}
    ${editing && html`<${EditUser} user=${editing} onClose=${() => setEditing(null)} onSaved=${() => { toast(`${editing.email} saved`); setEditing(null); res.reload(); }} />`}
    ${link && html`<${LinkBox} link=${link} onClose=${() => setLink(null)} />`}
    ${deleting && html`<${Confirm} title="Delete user" text=${`Delete ${deleting.email}? Their sessions end now.`} okLabel="Delete" danger onOk=${() => del(deleting)} onCancel=${() => setDeleting(null)} />`}
  `;
}
