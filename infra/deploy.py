"""Upload the bundles, then create, update or tear down the pipeline's CloudFormation stack.

::

    python -m infra.deploy --stack encore --db-secret-arn ARN --subnets subnet-a,subnet-b \\
        --security-groups sg-1 --code-bucket my-code --spark-image URI --bucket my-encore
    python -m infra.deploy --stack encore                     # update: new code, same parameters
    python -m infra.deploy --stack encore --start-popularity  # start the streaming job
    python -m infra.deploy --stack encore --delete [--purge-bucket]

A deploy builds the bundles (:mod:`infra.package`) and uploads each under a key holding
its content hash, skipping objects already there; then it creates the stack, or updates
it, and prints the stack's events until it settles. On an update every parameter not
given keeps its previous value, so ``--stack`` alone ships new code.

The presign secret comes from ``--presign-secret-arn`` (CloudFormation resolves it) or
from ``ENCORE_PRESIGN_SECRET`` in the environment (passed as a NoEcho parameter); it is
never a command-line argument, which would stay in the shell's history.

The streaming popularity job is not part of the stack: CloudFormation has no resource
for a job run. ``--start-popularity`` starts it in EMR Serverless's streaming mode
(restarted on failure) with the code of the last deploy; ``--delete`` cancels it first.

Limitations: a running popularity job keeps the code it started with; after a deploy
that changed the Spark code, cancel it (the command is printed when one is running) and
start it again. The template is sent inline, so it must stay under CloudFormation's
51,200-byte limit for a template body.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from encore.output import output_logger
from encore.settings import Settings, SettingsError
from infra import package

logger = logging.getLogger(__name__)
output = output_logger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "template.yaml"
TEMPLATE_BODY_LIMIT = 51_200

#: Command-line option (argparse dest) -> the template parameter it sets.
OPTION_PARAMETERS = {
    "db_secret_arn": "DatabaseSecretArn",
    "subnets": "SubnetIds",
    "security_groups": "SecurityGroupIds",
    "code_bucket": "CodeBucket",
    "spark_image": "SparkImageUri",
    "bucket": "BucketName",
    "presign_secret_arn": "PresignSecretArn",
    "alarm_email": "AlarmEmail",
}

POPULARITY_JOB_NAME = "encore-popularity"
ACTIVE_JOB_STATES = ["SUBMITTED", "PENDING", "SCHEDULED", "RUNNING", "QUEUED", "CANCELLING"]
#: The streaming job is restarted by EMR Serverless unless it fails this often.
POPULARITY_MAX_FAILURES_PER_HOUR = 5
#: Worker sizes of the streaming job, which runs all month: small, since a micro-batch
#: every few seconds holds little data. EMR Serverless's defaults (4 vCPU, 16 GB per
#: worker) would cost several times more.
POPULARITY_SPARK_OPTIONS = (
    "--conf spark.driver.cores=1 --conf spark.driver.memory=4g"
    " --conf spark.executor.cores=2 --conf spark.executor.memory=8g"
    " --conf spark.dynamicAllocation.minExecutors=1 --conf spark.dynamicAllocation.maxExecutors=2"
)


class DeployError(RuntimeError):
    """The deploy cannot go on; the message says what to give or fix."""


class StackFailed(RuntimeError):
    """CloudFormation settled the stack in a failed state."""


@dataclass(frozen=True)
class AwsClients:
    cloudformation: Any
    s3: Any
    emr: Any

    @classmethod
    def for_settings(cls, settings: Settings) -> AwsClients:
        kwargs = settings.boto3_kwargs()
        return cls(
            boto3.client("cloudformation", **kwargs),
            boto3.client("s3", **kwargs),
            boto3.client("emr-serverless", **kwargs),
        )


@dataclass(frozen=True)
class Upload:
    """Where the bundles went, as template parameters, and how many objects were new."""

    parameters: dict[str, str]
    uploaded: int
    present: int


# ---------------------------------------------------------------- deploy


def deploy(
    clients: AwsClients,
    stack_name: str,
    given: Mapping[str, str],
    *,
    code_prefix: str,
    build_dir: Path,
    poll_s: float,
) -> dict[str, str]:
    """Create or update ``stack_name`` with the parameters ``given``; return its outputs."""
    cfn = clients.cloudformation
    template = TEMPLATE.read_text()
    if len(template.encode()) > TEMPLATE_BODY_LIMIT:
        raise DeployError(
            f"{TEMPLATE.name} is {len(template.encode()):,} bytes; a template body may have "
            f"{TEMPLATE_BODY_LIMIT:,}: upload it and pass TemplateURL instead"
        )
    stack = describe_stack(cfn, stack_name)
    if stack is not None and stack["StackStatus"] == "ROLLBACK_COMPLETE":
        raise DeployError(
            f"stack {stack_name} failed to create and cannot be updated: "
            f"remove it with --delete, then deploy again"
        )
    if stack is not None and stack["StackStatus"].endswith("_IN_PROGRESS"):
        raise DeployError(f"stack {stack_name} is {stack['StackStatus']}: wait for it to settle")

    declared = _declared_parameters(cfn, template)
    previous = {item["ParameterKey"] for item in (stack or {}).get("Parameters", [])}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise DeployError(f"the template has no parameter {', '.join(unknown)}")
    if stack is None:
        _check_required(declared, given)

    code_bucket = given.get("CodeBucket") or _previous_value(stack, "CodeBucket")
    artifacts = package.build(build_dir)
    upload = upload_bundles(clients.s3, code_bucket, code_prefix, artifacts)
    logger.info(
        "bundles in s3://%s/%s: %d uploaded, %d already there",
        code_bucket,
        code_prefix,
        upload.uploaded,
        upload.present,
    )

    values = {**given, **upload.parameters}
    parameters: list[dict[str, Any]] = [
        {"ParameterKey": key, "ParameterValue": values[key]} for key in sorted(values)
    ]
    parameters += [
        {"ParameterKey": key, "UsePreviousValue": True}
        for key in sorted((previous & set(declared)) - set(values))
    ]
    request = {
        "StackName": stack_name,
        "TemplateBody": template,
        "Parameters": parameters,
        "Capabilities": ["CAPABILITY_IAM"],
        "Tags": [{"Key": "project", "Value": "encore"}],
    }

    if stack is None:
        logger.info("creating stack %s", stack_name)
        stack_id = cfn.create_stack(**request)["StackId"]
        seen: set[str] = set()
    else:
        stack_id = stack["StackId"]
        seen = _event_ids(cfn, stack_id)
        try:
            cfn.update_stack(**request)
        except ClientError as exc:
            if "No updates are to be performed" not in str(exc):
                raise
            logger.info("stack %s is up to date", stack_name)
            return outputs_of(stack)
        logger.info("updating stack %s", stack_name)

    settled = follow_stack(cfn, stack_id, seen, poll_s)
    if settled["StackStatus"] not in {"CREATE_COMPLETE", "UPDATE_COMPLETE"}:
        raise StackFailed(_failure_message(cfn, stack_id, settled))
    return outputs_of(settled)


def upload_bundles(
    s3: Any, bucket: str, prefix: str, artifacts: Mapping[str, package.Artifact]
) -> Upload:
    """Put every built file under a content-addressed key; return the code parameters."""
    keys: dict[Path, str] = {}
    for name in ("capture", "presign"):
        artifact = artifacts[name]
        keys[artifact.paths[0]] = f"{prefix}lambda/{name}-{artifact.digest}.zip"
    spark = artifacts["spark"]
    spark_prefix = f"{prefix}spark/{spark.digest}/"
    for path in spark.paths:
        keys[path] = spark_prefix + path.name

    uploaded = present = 0
    for path, key in keys.items():
        if _object_exists(s3, bucket, key):
            present += 1
            continue
        s3.upload_file(str(path), bucket, key)
        uploaded += 1
        logger.info("uploaded s3://%s/%s", bucket, key)

    parameters = {
        "CaptureCodeKey": keys[artifacts["capture"].paths[0]],
        "PresignCodeKey": keys[artifacts["presign"].paths[0]],
        "SparkCodePrefix": spark_prefix,
    }
    return Upload(parameters, uploaded, present)


def _object_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise DeployError(f"cannot read s3://{bucket}/{key}: {exc}") from exc
    return True


def _declared_parameters(cfn: Any, template: str) -> dict[str, bool]:
    """The template's parameters -> whether each has a default (CloudFormation validates)."""
    try:
        response = cfn.validate_template(TemplateBody=template)
    except ClientError as exc:
        raise DeployError(f"CloudFormation rejects {TEMPLATE.name}: {exc}") from exc
    return {item["ParameterKey"]: "DefaultValue" in item for item in response["Parameters"]}


def _check_required(declared: Mapping[str, bool], given: Mapping[str, str]) -> None:
    code = {"CaptureCodeKey", "PresignCodeKey", "SparkCodePrefix"}
    missing = sorted(
        key
        for key, has_default in declared.items()
        if not has_default and key not in given and key not in code
    )
    if missing:
        options = {parameter: option for option, parameter in OPTION_PARAMETERS.items()}
        named = [
            f"--{options[key].replace('_', '-')}" if key in options else f"--parameter {key}=..."
            for key in missing
        ]
        raise DeployError(f"a new stack needs {', '.join(named)}")
    if not (given.get("PresignSecretArn") or given.get("PresignSecret")):
        raise DeployError("a new stack needs --presign-secret-arn, or ENCORE_PRESIGN_SECRET set")


def _previous_value(stack: Mapping[str, Any] | None, key: str) -> str:
    for item in (stack or {}).get("Parameters", []):
        if item["ParameterKey"] == key:
            return str(item["ParameterValue"])
    raise DeployError(f"no {key} given and none in a previous deploy")


# ---------------------------------------------------------------- following the stack


def describe_stack(cfn: Any, stack: str) -> dict[str, Any] | None:
    try:
        return dict(cfn.describe_stacks(StackName=stack)["Stacks"][0])
    except ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise


def outputs_of(stack: Mapping[str, Any]) -> dict[str, str]:
    return {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])}


def follow_stack(cfn: Any, stack_id: str, seen: set[str], poll_s: float) -> dict[str, Any]:
    """Log the stack's new events until its status stops being ``*_IN_PROGRESS``."""
    while True:
        stack = dict(cfn.describe_stacks(StackName=stack_id)["Stacks"][0])
        events = cfn.describe_stack_events(StackName=stack_id)["StackEvents"]
        for event in reversed(events):
            if event["EventId"] in seen:
                continue
            seen.add(event["EventId"])
            reason = event.get("ResourceStatusReason", "")
            logger.info(
                "%s %-32s %s %s",
                event["Timestamp"].strftime("%H:%M:%S"),
                event["LogicalResourceId"],
                event["ResourceStatus"],
                reason,
            )
        if not stack["StackStatus"].endswith("_IN_PROGRESS"):
            return stack
        time.sleep(poll_s)


def _event_ids(cfn: Any, stack_id: str) -> set[str]:
    return {
        event["EventId"] for event in cfn.describe_stack_events(StackName=stack_id)["StackEvents"]
    }


def _failure_message(cfn: Any, stack_id: str, stack: Mapping[str, Any]) -> str:
    events = cfn.describe_stack_events(StackName=stack_id)["StackEvents"]
    causes = [
        f"{event['LogicalResourceId']}: {event.get('ResourceStatusReason', '')}"
        for event in events
        if event["ResourceStatus"].endswith("_FAILED")
    ]
    first = causes[-1] if causes else stack.get("StackStatusReason", "no reason given")
    return f"stack {stack['StackName']} ended {stack['StackStatus']}; first failure: {first}"


# ---------------------------------------------------------------- the streaming job


def start_popularity(
    emr: Any, outputs: Mapping[str, str], spark_options: str = POPULARITY_SPARK_OPTIONS
) -> str:
    """Start the streaming popularity job unless one is running; return its job run id.

    ``spark_options`` are added to the stack's spark-submit options (a later option wins).
    """
    application = outputs["EmrApplicationId"]
    for run in _active_runs(emr, application):
        if run.get("name") == POPULARITY_JOB_NAME:
            raise DeployError(
                f"popularity job {run['id']} is already {run['state']}; to restart it run "
                f"aws emr-serverless cancel-job-run --application-id {application} "
                f"--job-run-id {run['id']}, then start it again"
            )
    response = emr.start_job_run(
        applicationId=application,
        clientToken=str(uuid.uuid4()),
        name=POPULARITY_JOB_NAME,
        executionRoleArn=outputs["SparkJobRoleArn"],
        mode="STREAMING",
        retryPolicy={"maxFailedAttemptsPerHour": POPULARITY_MAX_FAILURES_PER_HOUR},
        jobDriver={
            "sparkSubmit": {
                "entryPoint": outputs["PopularityEntryPoint"],
                "entryPointArguments": [
                    "--bucket",
                    outputs["BucketName"],
                    "--scheme",
                    "s3",
                    "--continuous",
                ],
                "sparkSubmitParameters": f"{outputs['SparkSubmitParameters']} {spark_options}",
            }
        },
    )
    return str(response["jobRunId"])


def _active_runs(emr: Any, application: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    paginator = emr.get_paginator("list_job_runs")
    for page in paginator.paginate(applicationId=application, states=ACTIVE_JOB_STATES):
        runs.extend(page["jobRuns"])
    return runs


def stop_spark(emr: Any, application: str, poll_s: float, timeout_s: float = 900) -> int:
    """Cancel every active job run and stop the application; return how many were cancelled."""
    runs = _active_runs(emr, application)
    cancelled = 0
    for run in runs:
        if run["state"] != "CANCELLING":
            emr.cancel_job_run(applicationId=application, jobRunId=run["id"])
            cancelled += 1
            logger.info("cancelling job run %s (%s)", run["id"], run.get("name"))
    deadline = time.monotonic() + timeout_s
    while runs:
        if time.monotonic() > deadline:
            raise DeployError(
                f"job runs of application {application} did not stop in {timeout_s} s"
            )
        time.sleep(poll_s)
        runs = _active_runs(emr, application)

    emr.stop_application(applicationId=application)
    while emr.get_application(applicationId=application)["application"]["state"] != "STOPPED":
        if time.monotonic() > deadline:
            raise DeployError(f"application {application} did not stop in {timeout_s} s")
        time.sleep(poll_s)
    return cancelled


# ---------------------------------------------------------------- tear down


def delete(clients: AwsClients, stack_name: str, *, purge_bucket: bool, poll_s: float) -> None:
    """Stop the Spark jobs, delete the stack and, if asked, the retained bucket."""
    cfn = clients.cloudformation
    stack = describe_stack(cfn, stack_name)
    if stack is None:
        raise DeployError(f"there is no stack {stack_name}")
    outputs = outputs_of(stack)

    if "EmrApplicationId" in outputs:
        cancelled = stop_spark(clients.emr, outputs["EmrApplicationId"], poll_s)
        logger.info("Spark application stopped (%d job run(s) cancelled)", cancelled)
    seen = _event_ids(cfn, stack["StackId"])
    cfn.delete_stack(StackName=stack["StackId"])
    settled = follow_stack(cfn, stack["StackId"], seen, poll_s)
    if settled["StackStatus"] != "DELETE_COMPLETE":
        raise StackFailed(_failure_message(cfn, stack["StackId"], settled))

    bucket = outputs.get("BucketName")
    if bucket and purge_bucket:
        removed = purge(clients.s3, bucket)
        logger.info("bucket %s deleted with its %d object version(s)", bucket, removed)
    elif bucket:
        logger.info("bucket %s is kept with its data; --purge-bucket deletes it", bucket)


def purge(s3: Any, bucket: str) -> int:
    """Delete every version and delete marker in ``bucket``, then the bucket; return the count."""
    removed = 0
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket):
        doomed = [
            {"Key": item["Key"], "VersionId": item["VersionId"]}
            for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        # A page holds at most 1,000 entries, which is what one DeleteObjects takes.
        if doomed:
            response = s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise DeployError(f"cannot delete s3://{bucket}/{first['Key']}: {first['Message']}")
            removed += len(doomed)
    s3.delete_bucket(Bucket=bucket)
    return removed


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.deploy",
        description="Deploy the Encore pipeline's stack (docs/deploy.md).",
    )
    parser.add_argument("--stack", required=True, help="CloudFormation stack name")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION, else us-east-1)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--delete", action="store_true", help="tear the stack down")
    action.add_argument(
        "--start-popularity", action="store_true", help="start the streaming popularity job"
    )
    parser.add_argument(
        "--purge-bucket", action="store_true", help="with --delete: also delete the data bucket"
    )
    parser.add_argument(
        "--popularity-options",
        default=POPULARITY_SPARK_OPTIONS,
        help="with --start-popularity: spark-submit options sizing the streaming job",
    )

    stack = parser.add_argument_group("stack parameters (a new stack needs the first five)")
    stack.add_argument("--db-secret-arn", help="Secrets Manager secret of the replication user")
    stack.add_argument("--subnets", help="comma-separated subnet ids for the capture Lambda")
    stack.add_argument("--security-groups", help="comma-separated security group ids")
    stack.add_argument("--code-bucket", help="existing bucket in the region for the bundles")
    stack.add_argument("--spark-image", help="ECR image URI for the Spark jobs")
    stack.add_argument("--bucket", help="the pipeline's bucket name (default: encore-pipeline)")
    stack.add_argument("--presign-secret-arn", help="secret the app signs user tokens with")
    stack.add_argument("--alarm-email", help="address that receives the alarms")
    stack.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other template parameter; repeatable",
    )
    stack.add_argument("--code-prefix", default="encore/", help="key prefix for the bundles")
    stack.add_argument(
        "--build-dir", type=Path, default=package.DEFAULT_BUILD_DIR, help="where bundles are built"
    )
    stack.add_argument("--poll-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    return parser


def given_parameters(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    """Template parameters from the options, ``--parameter`` pairs and the presign secret."""
    given = {
        parameter: getattr(args, option)
        for option, parameter in OPTION_PARAMETERS.items()
        if getattr(args, option)
    }
    for pair in args.parameter:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"--parameter {pair!r} is not KEY=VALUE")
        given[key] = value
    if "PresignSecretArn" not in given and settings.presign_secret:
        given["PresignSecret"] = settings.presign_secret
    return given


def main(argv: Sequence[str] | None = None, clients: AwsClients | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.purge_bucket and not args.delete:
        output.error("--purge-bucket goes with --delete")
        return 2
    code_prefix = args.code_prefix if args.code_prefix.endswith("/") else args.code_prefix + "/"

    try:
        settings = Settings.load(**({"aws_region": args.region} if args.region else {}))
        clients = clients or AwsClients.for_settings(settings)
        if args.delete:
            delete(clients, args.stack, purge_bucket=args.purge_bucket, poll_s=args.poll_seconds)
            output.info("stack %s deleted", args.stack)
            return 0
        if args.start_popularity:
            stack = describe_stack(clients.cloudformation, args.stack)
            if stack is None:
                raise DeployError(f"there is no stack {args.stack}: deploy it first")
            run_id = start_popularity(clients.emr, outputs_of(stack), args.popularity_options)
            output.info("popularity job started: job run %s", run_id)
            return 0
        outputs = deploy(
            clients,
            args.stack,
            given_parameters(args, settings),
            code_prefix=code_prefix,
            build_dir=args.build_dir,
            poll_s=args.poll_seconds,
        )
    except (DeployError, SettingsError, package.PackagingError, ClientError) as exc:
        output.error("deploy failed: %s", exc)
        return 2
    except StackFailed as exc:
        output.error("deploy failed: %s", exc)
        return 1

    for key, value in sorted(outputs.items()):
        output.info("%s: %s", key, value)
    output.info("stack %s is deployed (%d outputs)", args.stack, len(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
