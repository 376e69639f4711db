"""`make airflow`: the Airflow UI (`airflow standalone`) on the embedded defaults, DAG ready to trigger.

Starts the embedded Postgres and the bundled Sketchfab-compatible server, then runs
`airflow standalone` (api-server, scheduler, dag-processor, triggerer; LocalExecutor,
SQLite metadata in `.airflow/`) with the connections and Variables pointing at them.
The DAG starts unpaused, so its first scheduled run begins right away.

Sign in as `admin`; the generated password is printed when Airflow is ready and kept in
`.airflow/simple_auth_manager_passwords.json.generated`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import devenv
from fake_sketchfab import Catalog


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=200, help="size of the demo catalog (default 200)")
    parser.add_argument("--weights", default=os.environ.get("AIRFLOW_VAR_SIMILARITY_VGG16_WEIGHTS", "random"))
    parser.add_argument(
        "--input-size", type=int, default=int(os.environ.get("AIRFLOW_VAR_SIMILARITY_INPUT_SIZE", 224))
    )
    parser.add_argument("--port", type=int, default=8080, help="Airflow UI port (default 8080)")
    parser.add_argument("--airflow-home", type=Path, default=devenv.ROOT / ".airflow")
    parser.add_argument("--db-uri", help="libpq URI of the similarity database (default: embedded, .pgdata/)")
    parser.add_argument(
        "--sketchfab-url",
        help="use this Sketchfab-compatible API instead of starting the bundled demo server",
    )
    parser.add_argument(
        "--thumbnail-hosts", default="localhost", help="with --sketchfab-url: allowed media hosts"
    )
    parser.add_argument("--thumbnails", type=Path, default=devenv.ROOT / "data" / "demo" / "thumbnails")
    parser.add_argument(
        "--api-port", type=int, default=devenv.DEMO_API_PORT, help="demo server port (0: any free port)"
    )
    args = parser.parse_args()

    db_uri = args.db_uri or devenv.start_postgres(devenv.ROOT / ".pgdata")
    with contextlib.ExitStack() as stack:
        if args.sketchfab_url:
            api_base_url, media_host = args.sketchfab_url, args.thumbnail_hosts
        else:
            server = stack.enter_context(
                devenv.start_demo_server(Catalog.generate(args.models), args.api_port)
            )
            api_base_url, media_host = server.api_base_url, server.media_host
            print(f"Sketchfab-compatible demo server: {api_base_url} ({args.models} models)", flush=True)
        env = devenv.airflow_env(
            airflow_home=args.airflow_home,
            db_uri=db_uri,
            api_base_url=api_base_url,
            thumbnail_store=args.thumbnails,
            thumbnail_hosts=media_host,
            weights=args.weights,
            input_size=args.input_size,
            extra={
                "AIRFLOW__API__PORT": str(args.port),
                "AIRFLOW__API__BASE_URL": f"http://localhost:{args.port}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{args.port}/execution/",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            },
        )
        devenv.migrate_metadata(env)
        passwords = args.airflow_home / "simple_auth_manager_passwords.json.generated"
        print(
            f"Airflow UI: http://localhost:{args.port} (user admin; password printed when ready, "
            f"and kept in {passwords})\n"
            f"Similarity gallery: http://localhost:{args.port}/similarity-gallery/",
            flush=True,
        )
        airflow = Path(sys.executable).parent / "airflow"
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run([str(airflow), "standalone"], env=env, cwd=devenv.ROOT, check=False)


if __name__ == "__main__":
    main()
