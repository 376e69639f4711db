"""`make airflow`: the Airflow UI (`airflow standalone`) on the embedded defaults.

Starts the embedded Postgres and the bundled Sketchfab-compatible server, then
runs `airflow standalone` with the connections and Variables pointing at them.
Airflow prints the UI address and the generated admin password; it is also in
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
from fake_sketchfab import Catalog, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--weights", default=os.environ.get("AIRFLOW_VAR_SIMILARITY_VGG16_WEIGHTS", "random"))
    parser.add_argument(
        "--input-size", type=int, default=int(os.environ.get("AIRFLOW_VAR_SIMILARITY_INPUT_SIZE", 224))
    )
    parser.add_argument("--port", type=int, default=8080, help="Airflow UI port")
    args = parser.parse_args()

    db_uri = devenv.start_postgres(devenv.ROOT / ".pgdata")
    with start_server(Catalog.generate(args.models)) as server:
        env = devenv.airflow_env(
            airflow_home=devenv.ROOT / ".airflow",
            db_uri=db_uri,
            api_base_url=server.api_base_url,
            thumbnail_store=devenv.ROOT / "data" / "demo" / "thumbnails",
            thumbnail_hosts=server.media_host,
            weights=args.weights,
            input_size=args.input_size,
            extra={"AIRFLOW__API__PORT": str(args.port)},
        )
        print(
            f"Sketchfab-compatible demo server: {server.api_base_url}; Airflow UI on http://localhost:{args.port}"
        )
        airflow = Path(sys.executable).parent / "airflow"
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run([str(airflow), "standalone"], env=env, cwd=devenv.ROOT, check=False)


if __name__ == "__main__":
    main()
