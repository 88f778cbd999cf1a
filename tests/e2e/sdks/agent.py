"""The README's snippets for agents on Azure OpenAI, Gemini and AWS (boto3), run as
written against latchkey's Envoy.

usage: agent.py BASE_URL PROXY_KEY -- prints one JSON object: what each SDK received.
"""
import json
import sys

base, key = sys.argv[1], sys.argv[2]
out = {}

# Azure OpenAI: the proxy key where the Azure key goes (the `api-key` header).
from openai import AzureOpenAI

azure = AzureOpenAI(azure_endpoint=base + "/azure", api_key=key, api_version="2024-10-21",
                    max_retries=0)
r = azure.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
out["azure"] = r.choices[0].message.content

# Gemini: the proxy key where the Gemini key goes (`x-goog-api-key`).
from google import genai
from google.genai import types

gemini = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base + "/gemini"))
out["gemini"] = gemini.models.generate_content(model="gemini-test", contents="hi").text

# AWS: no AWS credentials in the agent at all; latchkey signs. The proxy key rides in a
# header of its own.
import boto3
from botocore import UNSIGNED
from botocore.config import Config

dynamodb = boto3.client("dynamodb", endpoint_url=base + "/aws", region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))
dynamodb.meta.events.register(
    "before-send.dynamodb", lambda request, **_: request.headers.__setitem__("x-latchkey-key", key))
out["aws"] = dynamodb.list_tables()["TableNames"]

print(json.dumps(out))
