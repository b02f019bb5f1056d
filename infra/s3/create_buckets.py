"""Create the stack's buckets on the S3 server (its variables: infra/README.md); safe to rerun."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def setting(name: str) -> str:
    file_name = os.environ.get(f"{name}_FILE")
    value = Path(file_name).read_text().strip() if file_name else os.environ.get(name, "")
    if not value:
        print(f"s3-init: refusing: {name} is not set or is empty", file=sys.stderr)
        raise SystemExit(64)
    return value


def main() -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = setting("AWS_ENDPOINT_URL")
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=setting("S3_ADMIN_ACCESS_KEY"),
        aws_secret_access_key=setting("S3_ADMIN_SECRET_KEY"),
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    deadline = time.monotonic() + float(os.environ.get("S3_WAIT_S", "120"))
    for bucket in filter(None, (b.strip() for b in setting("S3_BUCKETS").split(","))):
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                print(f"s3-init: created {bucket}")
                break
            except ClientError as error:
                if error.response["Error"]["Code"] in EXISTS:
                    print(f"s3-init: {bucket} exists")
                    break
                raise SystemExit(f"s3-init: {endpoint} refused bucket {bucket}: {error}") from None
            except BotoCoreError as error:  # not up yet
                if time.monotonic() > deadline:
                    raise SystemExit(f"s3-init: {endpoint} did not answer: {error}") from None
                time.sleep(2)


if __name__ == "__main__":
    main()
