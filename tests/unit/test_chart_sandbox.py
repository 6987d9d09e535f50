"""The chart sandbox: values come back, model code cannot write outside its directory, spawn
processes, open sockets or kill anyone, and a hung or looping row is killed without hurting the
evaluator or the rows after it."""
import os
import time

import pytest

from hitq.evaluation.charts import corrected_match, corrected_source, evaluate_charts, official_pass

pd = pytest.importorskip("pandas")

BAR = "import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_excel('table.xlsx')\nplt.bar(df['k'], df['v'])\nplt.show()"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "tables").mkdir()
    pd.DataFrame({"k": ["a", "b", "c"], "v": [1.0, 2.5, 4.0]}).to_excel(root / "tables" / "t1.xlsx", index=False)
    return root


def _row(i, code, chart="BarChart Generation", ref="[1.0, 2.5, 4.0]"):
    return {"id": i, "FileName": "t1", "QuestionType": "Visualization", "SubQType": chart, "Question": "",
            "Reference": ref, "Prediction": code, "status": "done"}


def _run(data_dir, *codes, compat=False, timeout=2.0):
    rows = [_row(i, c) for i, c in enumerate(codes, 1)]
    return evaluate_charts(rows, data_dir, compat=compat, timeout_s=timeout)


@pytest.mark.parametrize("compat", [False, True])
def test_values_come_back_and_csv_is_readable(data_dir, compat):
    csv = BAR.replace("pd.read_excel('table.xlsx')", "pd.read_csv('table.csv')")
    out = _run(data_dir, BAR, csv if not compat else BAR, compat=compat)
    assert out[1]["ECR"] == 100.0 and out[1]["Pass@1"] == 100.0
    assert out[2]["Pass@1"] == 100.0


def test_writes_outside_the_sandbox_are_refused(data_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    code_write = f"import matplotlib.pyplot as plt\nopen({str(tmp_path / 'new.txt')!r}, 'w').write('x')\nplt.show()"
    code_remove = f"import os\nimport matplotlib.pyplot as plt\nos.remove({str(victim)!r})\nplt.show()"
    code_rename = f"import os\nos.rename({str(victim)!r}, 'stolen.txt')"
    code_inside = BAR.replace("plt.show()", "open('scratch.txt', 'w').write('fine')\nplt.show()")
    out = _run(data_dir, code_write, code_remove, code_rename, code_inside)
    for i in (1, 2, 3):
        assert out[i]["ECR"] == 0.0 and "sandbox" in out[i]["chart_error"]
    assert out[4]["ECR"] == 100.0  # the row's own directory is writable
    assert victim.read_text() == "keep" and not (tmp_path / "new.txt").exists()


def test_processes_sockets_and_signals_are_refused(data_dir):
    fork_bomb = "import os\nwhile True:\n    os.fork()"
    spawn = "import subprocess\nsubprocess.run(['true'])"
    system = "import os\nos.system('true')"
    sock = "import socket\nsocket.create_connection(('127.0.0.1', 9))"
    kill = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"
    out = _run(data_dir, fork_bomb, spawn, system, sock, kill)
    assert all(out[i]["ECR"] == 0.0 and "sandbox" in out[i]["chart_error"] for i in range(1, 6))


@pytest.mark.parametrize("compat", [False, True])
def test_infinite_loops_are_killed_and_later_rows_still_run(data_dir, compat):
    python_loop = "import pandas as pd\nwhile True:\n    pass\nplt.show()"
    c_loop = "import pandas as pd\nimport itertools\nany(itertools.repeat(False))\nplt.show()"  # a C loop: SIGALRM cannot interrupt it
    start = time.monotonic()
    out = _run(data_dir, python_loop, c_loop, BAR, compat=compat, timeout=1.0)
    assert time.monotonic() - start < 30
    assert out[1]["ECR"] == 0.0 and out[2]["ECR"] == 0.0
    assert out[2]["chart_reason"] == "timeout"
    assert out[3]["Pass@1"] == 100.0


def test_exit_and_memory_bombs_only_fail_their_row(data_dir):
    exit_code = "import sys\nsys.exit(3)"
    hard_exit = "import os\nos._exit(0)"
    memory = "x = bytearray(8 * 1024 ** 3)"
    out = _run(data_dir, exit_code, hard_exit, memory, BAR)
    assert [out[i]["ECR"] for i in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert out[4]["Pass@1"] == 100.0
    assert os.getpid() > 0  # still here


def test_corrected_extraction_repairs_indentation_and_keeps_numpy_imports():
    text = "import numpy as np\nimport pandas as pd \n import matplotlib.pyplot as plt \n for i in range(2):\n     plt.plot([i])\n plt.show()"
    src = corrected_source(text)
    assert src.startswith("import numpy as np") and "for i in range(2):\n    plt.plot" in src
    assert corrected_source("no code here") is None
    assert "'table.xlsx'" in corrected_source('import pandas as pd\ndf = pd.read_excel("data.xlsx")')


def test_comparisons():
    assert official_pass("[1.0, 2.0]", "[2.0, 1.0]\n", "BarChart") is True
    assert official_pass("[np.float64(1.0)]", "[1.0]", "BarChart") == "False"  # numpy-2 repr
    assert official_pass("", "[1.0]", "BarChart") == "None"
    # defect 22: the pie reference is re-normalised (sum 1.02), so the gold values themselves fail
    assert official_pass("[0.3, 0.36, 0.36]", "[0.3, 0.36, 0.36]", "PieChart") is False
    assert corrected_match([[0.3, 0.355, 0.355]], "[0.3, 0.36, 0.36]", "PieChart")
    assert corrected_match([[1.0, float("nan")]], "[nan, 1.0]", "LineChart")
    assert not corrected_match([[1.0, 2.0]], "[1.0, 2.5]", "BarChart")
