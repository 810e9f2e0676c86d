"""Tool declarations, built-in tools and the trusted tool host."""

from tools.registry import Tool, ToolError, ToolSet, build_toolset, load_tools_file, tool_from_dict

__all__ = ["Tool", "ToolError", "ToolSet", "build_toolset", "load_tools_file", "tool_from_dict"]
