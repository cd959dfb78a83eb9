"""Deploy an export on KServe + NVIDIA Triton: upload its repository, apply its InferenceServices.

The ``nec-serve deploy`` subcommand: :func:`add_parser` registers it, :func:`cmd_deploy`
runs it (upload, then unless ``--upload-only`` apply and wait), :func:`main` is
``python -m nec_serve.deploy``. Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from nec_serve.contract import Manifest
from nec_serve.deploy.apply import (
    apply_inference_services,
    make_kserve_client,
    require_service_account,
    wait_ready,
)
from nec_serve.deploy.repository import repository_dir, storage_uri, upload_repository
from nec_serve.deploy.services import (
    NAMESPACE,
    RUNTIME_VERSION,
    SERVICE_ACCOUNT,
    VARIANTS,
    build_inference_services,
)
from nec_serve.errors import NecError

__all__ = ["add_parser", "cmd_deploy", "main"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``deploy`` subcommand on an ``add_subparsers()`` object."""
    s = subparsers.add_parser(
        "deploy",
        help="upload a Triton repository to S3 and deploy it on KServe",
        description=__doc__.splitlines()[0],
    )
    s.add_argument("--model-dir", required=True, help="directory written by `nec-serve export`")
    s.add_argument("--variant", choices=VARIANTS, required=True, help="which repository")
    s.add_argument("--bucket", required=True, help="S3 bucket (must exist)")
    s.add_argument("--prefix", default="", help="key prefix inside the bucket, e.g. nec/v1")
    s.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, ...); default AWS")
    s.add_argument("--region", help="S3 region (default: boto3's, e.g. AWS_DEFAULT_REGION)")
    s.add_argument("--namespace", default=NAMESPACE, help="namespace of the InferenceServices")
    s.add_argument("--upload-only", action="store_true", help="upload, print storageUri, stop")
    s.add_argument(
        "--keep-stale",
        action="store_true",
        help="keep objects under the prefix that the repository does not have",
    )
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Ready")
    s.add_argument("--runtime-version", default=RUNTIME_VERSION, help="Triton image tag")
    s.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG / ~/.kube/config)")
    s.add_argument("--context", help="kubeconfig context")
    s.set_defaults(func=cmd_deploy)
    return s


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run ``nec-serve deploy``: upload, then (unless --upload-only) apply and wait."""
    try:
        repo = repository_dir(args.model_dir, args.variant)
        uri = storage_uri(args.bucket, args.prefix, args.variant)
        kclient = isvcs = None
        if not args.upload_only:
            # Fail on a missing kubeconfig or ServiceAccount before a long upload, not after.
            isvcs = build_inference_services(
                args.variant,
                uri,
                args.namespace,
                runtime_version=args.runtime_version,
                manifest=Manifest.load(args.model_dir),
            )
            kclient = make_kserve_client(args.kubeconfig, args.context)
            require_service_account(kclient, args.namespace, SERVICE_ACCOUNT)
        upload_repository(
            repo,
            args.bucket,
            args.prefix,
            args.variant,
            endpoint_url=args.endpoint_url,
            region=args.region,
            delete_stale=not args.keep_stale,
        )
        print(f"uploaded {repo} -> {uri}")
        if args.upload_only:
            return 0
        generations = apply_inference_services(
            kclient, isvcs, args.namespace, check_service_account=False
        )
        urls = wait_ready(
            kclient, list(generations), args.namespace, args.timeout, generations=generations
        )
    except NecError as err:
        print(f"nec-serve deploy: error: {err}", file=sys.stderr)
        return 2
    for name, url in urls.items():
        print(f"ready: {args.namespace}/{name} {url or ''}".rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nec_serve.deploy``: the ``deploy`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="nec-serve")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    return args.func(args)
