// Usher's waiting page: model picker with live queue badges, a chat box that shows the
// place in the queue, progress and the streamed answer, Cancel and "Switch to external
// provider", and an operator panel for admin tokens. Plain JavaScript, no build step.
//
// Credentials: an API token pasted by the user is kept in sessionStorage (this tab only)
// and sent as "Authorization: Bearer" on fetch calls; an empty token is simply not sent
// (a gateway in local open mode, or with a default token). EventSource cannot send
// headers: the gateway answers a submit (and POST /queue/watch-tokens) with a short-lived
// watch token in an HttpOnly cookie scoped to that request's path, which the browser sends
// with the stream on its own.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "usher.token";
  const REQUEST_KEY = "usher.request";
  const CONVERSATION_KEY = "usher.conversation";
  const LEVEL_WORDS = {
    available: "Available now",
    short: "Short queue",
    medium: "Medium queue",
    long: "Long queue",
  };
  const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    models: [],
    // Listed models that cannot chat (embedding-only): left out of the picker.
    notChat: new Set(),
    badges: new Map(),
    badgeSource: null,
    badgeRetry: 0,
    conversation: [],
    current: null, // {id, source, answer, text, firstPosition, lastEventId, done}
    operatorTimer: null,
  };

  // -- plumbing ---------------------------------------------------------------------------

  function headers(json) {
    const out = {};
    if (json) out["Content-Type"] = "application/json";
    if (state.token) out.Authorization = "Bearer " + state.token;
    return out;
  }

  function errorText(body, status) {
    if (body && typeof body.error === "object" && body.error) return body.error.message;
    if (body && body.message) return body.message;
    if (body && typeof body.error === "string") return body.error;
    return "HTTP " + status;
  }

  async function api(method, path, body) {
    const reply = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
    let data = null;
    try {
      data = await reply.json();
    } catch (_) {
      data = null;
    }
    if (!reply.ok) {
      const error = new Error(errorText(data, reply.status));
      error.status = reply.status;
      throw error;
    }
    return data;
  }

  function show(element, visible) {
    element.hidden = !visible;
  }

  function say(element, text) {
    // Only real changes reach the live region (no repeats read out again).
    if (element.textContent !== text) element.textContent = text;
  }

  function waitWords(wait) {
    if (!wait || wait.max_seconds <= 0) return "no wait";
    const max = wait.max_seconds;
    if (max < 60) return "wait under a minute";
    const lo = Math.max(1, Math.floor(wait.min_seconds / 60));
    const hi = Math.max(1, Math.ceil(max / 60));
    return lo === hi ? `wait about ${hi} min` : `wait ${lo}–${hi} min`;
  }

  // -- token ------------------------------------------------------------------------------

  function showTokenState() {
    $("token-state").textContent = state.token ? "(set)" : "(none)";
  }

  function setToken(value) {
    state.token = value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    $("access").open = false;
    showTokenState();
    startBadges();
    refreshOperator();
  }

  // -- models and badges ------------------------------------------------------------------

  async function loadModels() {
    try {
      const listed = await api("GET", "/v1/models");
      const names = listed.data.map((m) => m.id).sort();
      // The picker is for chatting: an embedding-only model cannot answer.
      const chat = await Promise.all(names.map(canChat));
      state.models = names.filter((_, i) => chat[i]);
      state.notChat = new Set(names.filter((_, i) => !chat[i]));
    } catch (error) {
      state.models = [];
      showModelsError("Cannot list models: " + error.message);
    }
    renderPicker();
  }

  // Whether a model can chat: Ollama's /api/show lists its capabilities ("completion",
  // "embedding", "tools", ...); without them (an OpenAI-compatible server, an error) its
  // name decides, as the gateway's own stand-in for /api/show does.
  async function canChat(name) {
    try {
      const described = await api("POST", "/api/show", { model: name });
      const capabilities = described && described.capabilities;
      if (Array.isArray(capabilities) && capabilities.length > 0) {
        return capabilities.includes("completion");
      }
    } catch (_) {
      // Unknown: judged by its name below.
    }
    return !/embed/i.test(name);
  }

  function showModelsError(text) {
    const element = $("models-error");
    element.textContent = text;
    show(element, Boolean(text));
  }

  function renderPicker() {
    const select = $("model");
    const chosen = select.value || sessionStorage.getItem("usher.model") || "";
    // Badged models too (one asked for by name), never one known not to chat.
    const names = Array.from(new Set([...state.models, ...state.badges.keys()]))
      .filter((name) => !state.notChat.has(name))
      .sort();
    select.replaceChildren(
      ...names.map((name) => {
        const option = document.createElement("option");
        const badge = state.badges.get(name);
        option.value = name;
        option.textContent = badge ? badge.label : name;
        return option;
      })
    );
    if (names.includes(chosen)) select.value = chosen;
    renderBadges();
  }

  function renderBadges() {
    const list = $("badges");
    const items = [];
    for (const name of Array.from(state.badges.keys()).sort()) {
      const badge = state.badges.get(name);
      const item = document.createElement("li");
      item.className = `badge level-${badge.level}`;
      item.dataset.model = name;
      item.dataset.level = badge.level;
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.setAttribute("aria-hidden", "true");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = badge.label;
      const level = document.createElement("span");
      level.className = "level";
      level.textContent = LEVEL_WORDS[badge.level] || badge.level;
      const wait = document.createElement("span");
      wait.className = "wait";
      // External runs take no slot of the fleet: apart (as usher.messages.running_phrase).
      const external = badge.external_running > 0 ? ` +${badge.external_running} external` : "";
      wait.textContent = `${badge.running}/${badge.capacity} running${external} • ${waitWords(badge.wait)}`;
      item.append(dot, label, level, wait);
      items.push(item);
    }
    list.replaceChildren(...items);
    renderSuggestion();
  }

  function renderSuggestion() {
    const badge = state.badges.get($("model").value);
    const box = $("suggestion");
    const use = $("suggestion-use");
    if (!badge || !badge.suggestion) {
      show(box, false);
      return;
    }
    $("suggestion-text").textContent = badge.suggestion;
    const local = state.models.includes(badge.suggested_model);
    use.textContent = `Use ${badge.suggested_model}`;
    use.dataset.model = badge.suggested_model;
    show(use, local);
    show(box, true);
  }

  async function startBadges() {
    if (state.badgeSource) state.badgeSource.close();
    state.badgeSource = null;
    try {
      // A cookie for /queue/models: EventSource sends it without being told.
      await api("POST", "/queue/watch-tokens", {});
    } catch (error) {
      showModelsError(
        error.status === 401 ? "Paste an access token to see the queues." : error.message
      );
      return;
    }
    showModelsError("");
    // Name the picker's models: each gets a badge even before its first request.
    const names = state.models.join(",");
    const source = new EventSource(
      "/queue/models/events" + (names ? "?model=" + encodeURIComponent(names) : "")
    );
    state.badgeSource = source;
    source.onmessage = (event) => {
      state.badgeRetry = 0;
      const body = JSON.parse(event.data);
      for (const badge of body.badges) state.badges.set(badge.model, badge);
      renderPicker();
    };
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED || state.badgeSource !== source) return;
      // Refused (an expired watch token): get a new one and open again.
      const delay = Math.min(30000, 1000 * 2 ** state.badgeRetry++);
      setTimeout(startBadges, delay);
    };
  }

  // -- one request ------------------------------------------------------------------------

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    $("conversation").append(item);
    return body;
  }

  function chatError(text) {
    $("chat-error").textContent = text;
    show($("chat-error"), Boolean(text));
  }

  function saveConversation() {
    sessionStorage.setItem(CONVERSATION_KEY, JSON.stringify(state.conversation));
  }

  function restoreConversation() {
    // A reload keeps the chat (this tab only), the pending question included.
    try {
      state.conversation = JSON.parse(sessionStorage.getItem(CONVERSATION_KEY) || "[]");
    } catch (_) {
      state.conversation = [];
    }
    for (const message of state.conversation) addMessage(message.role, message.content);
  }

  function remember() {
    const c = state.current;
    if (!c || c.done) sessionStorage.removeItem(REQUEST_KEY);
    else sessionStorage.setItem(REQUEST_KEY, JSON.stringify({ id: c.id }));
  }

  async function submit(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    const model = $("model").value;
    if (!prompt || !model || (state.current && !state.current.done)) return;
    chatError("");
    sessionStorage.setItem("usher.model", model);
    state.conversation.push({ role: "user", content: prompt });
    saveConversation();
    addMessage("user", prompt);
    $("prompt").value = "";
    $("send").disabled = true;
    try {
      const queued = await api("POST", "/queue/requests", {
        model,
        messages: state.conversation,
      });
      follow(queued);
    } catch (error) {
      state.conversation.pop();
      saveConversation();
      chatError(error.message);
      $("send").disabled = false;
    }
  }

  function follow(request) {
    state.current = {
      id: request.id,
      source: null,
      answer: null,
      text: "",
      firstPosition: request.position || 0,
      lastEventId: "",
      done: false,
      retries: 0,
    };
    remember();
    show($("request"), true);
    show($("cancel"), true);
    $("cancel").disabled = false;
    $("progress").value = 0;
    apply(request);
    if (!state.current.done) watch();
  }

  function watch() {
    const c = state.current;
    const query = c.lastEventId ? `?last_event_id=${encodeURIComponent(c.lastEventId)}` : "";
    const source = new EventSource(`/queue/requests/${c.id}/events${query}`);
    c.source = source;
    source.onmessage = (event) => {
      c.retries = 0;
      if (event.lastEventId) c.lastEventId = event.lastEventId;
      apply(JSON.parse(event.data));
    };
    source.addEventListener("end", (event) => {
      source.close();
      const body = JSON.parse(event.data || "{}");
      if (!body.error || c.done) return;
      // The status service was away (5xx): the request itself goes on, watch again.
      if ((body.status || 500) >= 500) rewatch();
      else finish({ state: "failed", message: body.error });
    });
    source.onerror = () => {
      if (c.done || source.readyState !== EventSource.CLOSED) return;
      // The watch token expired (or the gateway restarted): a new one, then resume.
      rewatch();
    };
  }

  function rewatch() {
    const c = state.current;
    const delay = Math.min(15000, 500 * 2 ** c.retries++);
    setTimeout(async () => {
      if (state.current !== c || c.done) return;
      try {
        await api("POST", "/queue/watch-tokens", { request_id: c.id });
      } catch (error) {
        if (error.status === 403 || error.status === 404) {
          finish({ state: "failed", message: error.message });
          return;
        }
      }
      if (!c.done && state.current === c) watch();
    }, delay);
  }

  function title(text) {
    // Someone waiting in another tab sees their place (and the answer being ready) here.
    document.title = text ? `${text} — Usher` : "Usher";
  }

  function apply(update) {
    const c = state.current;
    if (!c || c.done) return;
    if (update.kind === "running" || update.kind === "requeued") {
      // A new run starts from the beginning (a requeued request's output so far is void).
      c.text = "";
      if (c.answer) c.answer.textContent = "";
    }
    if (update.text) {
      if (!c.answer) c.answer = addMessage("assistant", "");
      c.text += update.text;
      c.answer.textContent = c.text;
    }
    if (update.model) {
      const where = update.route === "external" ? "external provider" : "local model";
      $("request-model").textContent = `${update.model} • ${where}`;
    }
    const progress = $("progress");
    show($("fair-note"), update.state === "queued" && update.route !== "external");
    if (update.state === "queued") {
      show($("spinner"), false);
      if (update.position) {
        c.firstPosition = Math.max(c.firstPosition, update.position);
        progress.max = c.firstPosition;
        progress.value = c.firstPosition - update.position;
      }
      say($("status"), update.message || "Your request has been queued");
      title(update.position ? `#${update.position} of ${update.queue_length}` : "Queued");
    } else if (update.state === "running") {
      show($("spinner"), true);
      title("Answering…");
      progress.max = 100;
      progress.value = Math.round((update.progress || 0) * 100);
      // Token by token the percentage changes: the live region hears the state changes
      // and "Almost ready", not every percent.
      if (update.kind !== "progress" || (update.message || "").includes("Almost ready")) {
        say($("status"), update.message);
      }
    }
    show($("switch"), Boolean(update.switch_offered));
    const offer = $("offer");
    offer.textContent = update.prompt || "";
    show(offer, Boolean(update.prompt));
    if (TERMINAL.has(update.state)) finish(update);
  }

  function finish(update) {
    const c = state.current;
    c.done = true;
    if (c.source) c.source.close();
    remember();
    show($("spinner"), false);
    show($("cancel"), false);
    show($("switch"), false);
    show($("offer"), false);
    show($("fair-note"), false);
    if (update.state === "completed") {
      const text = update.result ? update.result.text : c.text;
      if (!c.answer) c.answer = addMessage("assistant", "");
      if (text && text.length >= c.text.length) c.answer.textContent = text;
      state.conversation.push({ role: "assistant", content: c.answer.textContent });
      saveConversation();
      $("progress").max = 100;
      $("progress").value = 100;
    } else {
      // The question stays on screen but leaves the history the model sees next time.
      state.conversation.pop();
      saveConversation();
    }
    say($("status"), update.message || `Your request ${update.state}`);
    title(update.state === "completed" ? "✓ Ready" : "");
    $("send").disabled = false;
  }

  async function cancel() {
    const c = state.current;
    if (!c || c.done) return;
    $("cancel").disabled = true;
    try {
      const cancelled = await api("DELETE", `/queue/requests/${c.id}`);
      say($("status"), cancelled.message || "Cancelling your request…");
    } catch (error) {
      chatError(error.message);
      $("cancel").disabled = false;
    }
  }

  async function switchProvider() {
    const c = state.current;
    if (!c || c.done) return;
    $("switch").disabled = true;
    try {
      const moved = await api("POST", `/queue/requests/${c.id}/switch`);
      apply(moved);
    } catch (error) {
      chatError(error.message);
    } finally {
      $("switch").disabled = false;
    }
  }

  async function resume() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(REQUEST_KEY) || "null");
    } catch (_) {
      saved = null;
    }
    if (!saved || !saved.id) return;
    try {
      await api("POST", "/queue/watch-tokens", { request_id: saved.id });
      const now = await api("GET", `/queue/requests/${saved.id}`);
      // Still waiting or running: watch on. Finished meanwhile: show how it ended.
      $("send").disabled = true;
      follow(now);
    } catch (_) {
      sessionStorage.removeItem(REQUEST_KEY);
    }
  }

  // -- operator panel ---------------------------------------------------------------------

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = String(text);
    return td;
  }

  function button(text, onClick, label) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  function renderOperator(view) {
    const queues = view.queues.map((q) => {
      const row = document.createElement("tr");
      const actions = document.createElement("td");
      const group = document.createElement("div");
      group.className = "actions";
      group.append(
        button(
          q.paused ? "Resume" : "Pause",
          () => operate("/admin/queue/pause", { model: q.model, paused: !q.paused }),
          `${q.paused ? "Resume" : "Pause"} ${q.model}`
        ),
        button(
          "Drain",
          () => {
            if (window.confirm(`End every queued request of ${q.model}?`)) {
              operate("/admin/queue/drain", { model: q.model, reason: "drained by an operator" });
            }
          },
          `Drain ${q.model}`
        )
      );
      actions.append(group);
      row.append(
        cell(q.model),
        cell(q.queued),
        cell(q.running),
        cell(q.completed),
        cell(q.dead_letters),
        cell(q.paused ? "paused" : "running"),
        actions
      );
      return row;
    });
    $("queues").tBodies[0].replaceChildren(...queues);
    const instances = view.instances.map((i) => {
      const row = document.createElement("tr");
      const name = i.external ? `${i.id} (external)` : i.id;
      const health = i.draining ? `${i.health}, draining` : i.health;
      row.append(
        cell(name),
        cell(health),
        cell(i.circuit),
        cell(`${i.active}/${i.parallel}`),
        cell(i.loaded.join(", ") || "—")
      );
      return row;
    });
    $("instances").tBodies[0].replaceChildren(...instances);
    const dead = view.dead_letters.map((d) => {
      const item = document.createElement("li");
      item.textContent = `${d.model} • ${d.id} • ${d.tenant} • ${d.attempts} attempts • ${d.error}`;
      return item;
    });
    if (!dead.length) {
      const none = document.createElement("li");
      none.textContent = "None";
      dead.push(none);
    }
    $("dead-letters").replaceChildren(...dead);
  }

  async function operate(path, body) {
    try {
      const done = await api("POST", path, body);
      say(
        $("operator-status"),
        "drained" in done
          ? `${done.model}: ${done.drained} queued requests ended`
          : `${done.model}: ${done.paused ? "paused" : "resumed"}`
      );
    } catch (error) {
      say($("operator-status"), error.message);
    }
    refreshOperator();
  }

  async function refreshOperator() {
    clearTimeout(state.operatorTimer);
    try {
      renderOperator(await api("GET", "/admin/overview"));
      show($("operator"), true);
      state.operatorTimer = setTimeout(refreshOperator, 3000);
    } catch (_) {
      show($("operator"), false); // not an admin: no panel
    }
  }

  // -- start ------------------------------------------------------------------------------

  function start() {
    showTokenState();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setToken($("token").value);
    });
    $("token-clear").addEventListener("click", () => setToken(""));
    $("chat-form").addEventListener("submit", submit);
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("model").addEventListener("change", renderSuggestion);
    $("suggestion-use").addEventListener("click", (event) => {
      $("model").value = event.currentTarget.dataset.model;
      renderSuggestion();
      $("model").focus();
    });
    $("cancel").addEventListener("click", cancel);
    $("switch").addEventListener("click", switchProvider);
    restoreConversation();
    loadModels().then(startBadges);
    refreshOperator();
    resume();
  }

  start();
})();
