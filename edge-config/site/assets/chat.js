// The demo chat: keeps the conversation in the page and streams each answer
// from the OpenAI-compatible API behind the edge (server-sent events).
"use strict";

const MODEL = "smollm2-135m-instruct";
const messages = [{ role: "system", content: "You are a helpful assistant." }];
const log = document.getElementById("log");
const form = document.getElementById("ask");
const prompt = document.getElementById("prompt");
const status = document.getElementById("status");

function append(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  log.appendChild(item);
  return item;
}

// Yields the JSON payload of each `data:` event until `[DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text) return;
  messages.push({ role: "user", content: text });
  append("user", text);
  prompt.value = "";
  const answer = append("assistant", "");
  status.textContent = "…";
  form.querySelector("button").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: MODEL, messages, stream: true, temperature: 0, max_tokens: 256 }),
    });
    if (!response.ok) {
      // The edge and the GPU host answer errors as JSON with a message.
      const body = await response.json().catch(() => ({}));
      const message = body.error?.message ?? response.statusText;
      const retry = response.headers.get("Retry-After");
      throw new Error(`${response.status}: ${message}${retry ? ` (retry in ${retry}s)` : ""}`);
    }
    for await (const chunk of events(response)) {
      answer.textContent += chunk.choices?.[0]?.delta?.content ?? "";
    }
    messages.push({ role: "assistant", content: answer.textContent });
    status.textContent = "";
  } catch (error) {
    answer.className = "error";
    answer.textContent = String(error.message ?? error);
    messages.pop();
    status.textContent = "";
  } finally {
    form.querySelector("button").disabled = false;
  }
});
