"""An agent using the official openai and anthropic SDKs through latchkey's Envoy.

usage: client.py BASE_URL PROXY_KEY SCENARIO -- prints one JSON object: what the SDK
received (each chunk with its arrival time since the call began), or the API error.
"""
import json
import sys
import time

import anthropic
import openai

base, key, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "hello"}]
t0 = time.monotonic()


def since():
    return round(time.monotonic() - t0, 4)


def run():
    oa = openai.OpenAI(base_url=base + "/openai/v1", api_key=key, max_retries=0, timeout=10)
    an = anthropic.Anthropic(base_url=base + "/anthropic", api_key=key, max_retries=0, timeout=10)
    if scenario in ("openai-stream", "openai-no-usage"):
        model = "gpt-test" if scenario == "openai-stream" else "no-usage"
        chunks = []
        for chunk in oa.chat.completions.create(model=model, messages=messages, stream=True):
            chunks.append({
                "t": since(),
                "content": chunk.choices[0].delta.content if chunk.choices else None,
                "usage": chunk.usage.model_dump() if chunk.usage else None,
            })
        return {"chunks": chunks}
    if scenario == "openai-hangup":
        stream = oa.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        first = next(iter(stream))
        stream.close()
        return {"first": first.choices[0].delta.content}
    if scenario == "openai-json":
        r = oa.chat.completions.create(model="gpt-test", messages=messages)
        return {"content": r.choices[0].message.content, "usage": r.usage.model_dump()}
    if scenario == "anthropic-stream":
        chunks = []
        with an.messages.stream(model="claude-test", max_tokens=64, messages=messages) as s:
            for text in s.text_stream:
                chunks.append({"t": since(), "content": text})
            final = s.get_final_message()
        return {"chunks": chunks, "usage": final.usage.model_dump()}
    if scenario == "anthropic-json":
        r = an.messages.create(model="claude-test", max_tokens=64, messages=messages)
        return {"content": r.content[0].text, "usage": r.usage.model_dump()}
    raise SystemExit(f"unknown scenario {scenario}")


try:
    out = run()
except (openai.APIStatusError, anthropic.APIStatusError) as e:
    out = {"error_status": e.status_code, "error": e.body}
except (openai.APITimeoutError, anthropic.APITimeoutError) as e:
    out = {"error": "timeout"}
print(json.dumps(out))
