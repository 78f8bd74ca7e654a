"""The run's record in MLflow, without ROS: the writer, its params, pictures and summary.

`mlflow_run` writes the run; `run_params` turns launch arguments and node
parameters into run params; `pictures` draws the exploration map and the
frame/prediction samples; `summary` makes the end-of-run summary. The
`recorder` node (ami_ros.nodes.recorder) feeds them from topics.
"""
