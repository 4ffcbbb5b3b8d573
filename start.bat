@echo off
rem FitVideo on Windows: double-click, or run "start.bat --port 7861 --int8" (flags pass through to app.py).
rem First run: finds Python 3.10+, creates .venv, installs the CUDA build of torch and the requirements.
rem Set TORCH_INDEX to choose another CUDA build (e.g. .../whl/cu126) before running.
setlocal EnableDelayedExpansion
cd /d "%~dp0"
set "VENV=.venv"
if not defined TORCH_INDEX set "TORCH_INDEX=https://download.pytorch.org/whl/cu128"

set "PY="
for %%P in ("py -3.12" "py -3.11" "py -3.10" "py -3" "python" "python3") do (
  if not defined PY (
    %%~P -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" >nul 2>&1 && set "PY=%%~P"
  )
)
if not defined PY (
  echo [fitvideo] Python 3.10 or newer was not found. Install it from python.org and tick "Add python.exe to PATH".
  goto :fail
)

if not exist "%VENV%\Scripts\python.exe" (
  echo [fitvideo] creating %VENV% with !PY!
  !PY! -m venv "%VENV%" || goto :fail
)

rem Reinstall only when requirements.txt changed since the last successful install.
fc /b requirements.txt "%VENV%\.installed" >nul 2>&1
if errorlevel 1 (
  echo [fitvideo] installing torch 2.13.0 ^(CUDA build^) and the requirements; the first run downloads a few GB
  "%VENV%\Scripts\python.exe" -m pip install --disable-pip-version-check "torch==2.13.0" --index-url %TORCH_INDEX% || goto :fail
  "%VENV%\Scripts\python.exe" -m pip install --disable-pip-version-check -c constraints.txt -r requirements.txt || goto :fail
  "%VENV%\Scripts\python.exe" -m pip install --disable-pip-version-check --no-deps "spandrel==0.4.2" || goto :fail
  copy /y requirements.txt "%VENV%\.installed" >nul
)

"%VENV%\Scripts\python.exe" app.py %*
if errorlevel 1 goto :fail
exit /b 0

:fail
echo.
echo [fitvideo] Something went wrong; the messages above say what. Press a key to close this window.
pause >nul
exit /b 1
