"""Creates and rotates a secret in a local AWS Secrets Manager (moto's server), with
botocore as AWS's own tools would: `create NAME VALUE` or `put NAME VALUE`.
The endpoint comes from AWS_ENDPOINT_URL_SECRETS_MANAGER."""

import os
import sys

import botocore.session

command, name, value = sys.argv[1:4]
client = botocore.session.get_session().create_client(
    "secretsmanager",
    region_name=os.environ.get("AWS_REGION", "us-east-1"),
    endpoint_url=os.environ["AWS_ENDPOINT_URL_SECRETS_MANAGER"],
    aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
)
if command == "create":
    client.create_secret(Name=name, SecretString=value)
elif command == "put":
    client.put_secret_value(SecretId=name, SecretString=value)
else:
    sys.exit(f"unknown command {command}")
